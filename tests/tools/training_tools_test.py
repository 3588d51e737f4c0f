#!/usr/bin/env python3
"""Tests of the LoRA trainers' argument checks (tools/training_args.py and
the tools that use it: train_brick.py, train_exits.py,
train_sparse_recovery.py, relufy.py, apply_relu_delta.py). Standard library only.

Each case runs a trainer as a user would, with PyTorch and the packages
around it blocked (tool_harness.Fixture): a bad argument must be refused
(exit 1, the flag or file named, no traceback) before any of them loads,
and nothing written; valid arguments must get as far as the first of them.

Run from the repo root: python3 tests/tools/training_tools_test.py
"""
import argparse
import json
import os
import struct
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tool_harness import BLOCKED, Fixture, ToolTestCase  # noqa: E402
import training_args as ta  # noqa: E402  (tool_harness put tools/ on the path)
from brick_fingerprint import fingerprint  # noqa: E402

TOOLS = ("train_brick.py", "train_exits.py", "train_sparse_recovery.py")  # relufy: its own test


def write_header(path, shapes):
    """A safetensors file of float32 tensors {name: shape}: its header, then
    zero bytes for the data."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(offset))


class TrainerRefusalTest(ToolTestCase):
    def setUp(self):
        super().setUp()
        self.out = os.path.join(self.tmp, "new")
        self.written = self.out

    def train(self, tool, *extra):
        """A trainer's run with valid arguments but extra."""
        args = ["--model", self.fx.model, "--sets", self.fx.sets, "--out", self.out]
        if tool == "train_brick.py":
            args += ["--task", "py-docstring"]
        if tool == "train_sparse_recovery.py":
            args += ["--partition", self.fx.partition]
        return self.fx.run(tool, *args, *extra)

    def test_valid_arguments_reach_pytorch(self):
        for tool in TOOLS:
            with self.subTest(tool=tool):
                self.assertPassedChecks(self.train(tool))
        brick = self.fx.lora("bricks/py-exits/2")
        self.assertPassedChecks(self.train("train_exits.py", "--eval", brick))
        self.assertPassedChecks(self.train("train_exits.py", "--eval"))  # base model only
        self.assertPassedChecks(self.train("train_sparse_recovery.py", "--eval-only", brick))
        self.assertPassedChecks(self.train("train_sparse_recovery.py", "--init", brick))
        # Recovery's loss needs no in-batch negatives.
        self.assertPassedChecks(self.train("train_sparse_recovery.py", "--batch", "1"))

    def test_shared_flags(self):
        cases = [
            (["--steps", "0"], ["--steps must be >= 1"]),
            (["--lr", "0"], ["--lr", "> 0"]),
            (["--lr", "nan"], ["--lr"]),
            (["--lr", "inf"], ["--lr"]),
            (["--warmup", "1.5"], ["--warmup"]),
            (["--warmup", "nan"], ["--warmup"]),
            (["--warmup", "-0.1"], ["--warmup"]),
            (["--rank", "0"], ["--rank must be >= 1"]),
            (["--alpha", "0"], ["--alpha must be >= 1"]),
            (["--dropout", "1"], ["--dropout"]),
            (["--scale", "0"], ["--scale"]),
            (["--scale", "nan"], ["--scale"]),
            (["--threads", "0"], ["--threads must be >= 1"]),
            (["--version", "0"], ["--version must be >= 1"]),
            (["--max-bytes", "0"], ["--max-bytes must be >= 1"]),
            (["--max-length", "1"], ["--max-length", "[2, 512]"]),
            (["--max-length", "513"], ["--max-length", "[2, 512]"]),
            (["--model", os.path.join(self.tmp, "nowhere")], ["--model", "config.json"]),
            (["--sets", os.path.join(self.tmp, "nowhere")],
             ["--sets", "py-docstring/train.jsonl"]),
        ]
        for tool in TOOLS:
            for extra, names in cases:
                with self.subTest(tool=tool, extra=extra):
                    self.assertRefused(self.train(tool, *extra), tool[:-3], *names)
        for tool in ("train_brick.py", "train_exits.py"):  # in-batch negatives
            with self.subTest(tool=tool, extra="--batch 1"):
                self.assertRefused(self.train(tool, "--batch", "1"), "--batch must be >= 2")
        self.assertRefused(self.train("train_sparse_recovery.py", "--batch", "0"),
                           "--batch must be >= 1")

    def test_train_exits_teacher_manifest(self):
        brick = self.fx.lora("bricks/py-docstring/1")
        manifest = os.path.join(brick, "brick.json")
        bad = {
            "not an object": ("[]", [manifest, "not a JSON object"]),
            "instructions a list": ('{"instructions": []}', [manifest, "instructions is not"]),
            "query a string": ('{"instructions": {"query": "q"}}',
                               [manifest, "instructions.query is not a list of strings"]),
            "document numbers": ('{"instructions": {"query": [], "document": [1]}}',
                                 [manifest, "instructions.document"]),
            "another model": ('{"base_model": {"fingerprint": "0123456789abcdef"}}',
                              ["--teacher", brick, "0123456789ab", "--model", self.fx.model,
                               "another model"]),
        }
        for case, (text, names) in bad.items():
            with self.subTest(manifest=case):
                with open(manifest, "w") as f:
                    f.write(text)
                self.assertRefused(self.train("train_exits.py", "--teacher", brick),
                                   "train_exits", *names)
        made_for = json.dumps({"base_model": {"fingerprint": fingerprint(self.fx.model)}})
        for text in ('{"instructions": {"query": ["q:"], "document": ["d:"]}}',
                     '{"instructions": {"query": [], "document": []}}', '{}', made_for):
            with self.subTest(manifest=text):
                with open(manifest, "w") as f:
                    f.write(text)
                self.assertPassedChecks(self.train("train_exits.py", "--teacher", brick))
        self.assertPassedChecks(self.train("train_exits.py", "--teacher", "base"))

    def test_train_exits_weights(self):
        for args in (["--exit-weights", "uniform"], ["--exit-weights", "only:3", "--distill", "0"],
                     ["--exit-weights", "only:6", "--distill", "0"]):
            with self.subTest(args=args):
                self.assertPassedChecks(self.train("train_exits.py", *args))

    def test_existing_version(self):
        existing = {"train_brick.py": "py-docstring/1", "train_exits.py": "py-exits/1",
                    "train_sparse_recovery.py": "ffn-recovery-50/1"}
        for tool, name in existing.items():
            folder = self.fx.lora(os.path.join("new", name))
            with self.subTest(tool=tool):
                result = self.train(tool)
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertIn(f"{folder} exists", result.stderr)
                self.assertIn("--force", result.stderr)
                self.assertNotIn(BLOCKED, result.stderr)
                self.assertPassedChecks(self.train(tool, "--force"))
        # --id and --objective pick the folder; --full-weights publishes nothing.
        self.assertPassedChecks(self.train("train_exits.py", "--objective", "last-exit"))
        self.assertPassedChecks(self.train("train_exits.py", "--id", "other"))
        self.assertPassedChecks(self.train("train_sparse_recovery.py", "--full-weights"))
        self.assertPassedChecks(self.train("train_sparse_recovery.py", "--fraction", "0.25"))

    def test_train_exits(self):
        extra = os.path.join(self.tmp, "extra.jsonl")
        brick = self.fx.lora("bricks/py-exits/2")
        bad_brick = self.fx.lora("bricks/bad/1", r=0)
        cases = [
            (["--recommended-exit", "0"], ["--recommended-exit", "[1, 6]"]),
            (["--recommended-exit", "7"], ["--recommended-exit", "[1, 6]"]),
            (["--distill", "-1"], ["--distill"]),
            (["--distill", "nan"], ["--distill"]),
            (["--chunks", "0"], ["--chunks must be >= 1"]),
            (["--subset", "0"], ["--subset"]),
            (["--subset", "1.5"], ["--subset"]),
            (["--module-blocks", "-1"], ["--module-blocks"]),
            (["--extra-pairs", extra], ["--extra-pairs", extra]),
            (["--eval", brick, "--eval-pairs", "0"], ["--eval-pairs must be >= 1"]),
            (["--eval", self.fx.partition], ["--eval", "adapter_config.json"]),
            (["--eval", bad_brick], ["adapter_config.json", "r is 0"]),
            (["--exit-weights", "square"], ["--exit-weights", "only:K", "[1, 6]"]),
            (["--exit-weights", "only:0", "--distill", "0"], ["--exit-weights", "'only:0'"]),
            (["--exit-weights", "only:7", "--distill", "0"], ["--exit-weights", "[1, 6]"]),
            (["--exit-weights", "only:x", "--distill", "0"], ["--exit-weights"]),
            (["--exit-weights", "only:3"], ["--exit-weights only:3", "--distill 0"]),
            (["--teacher", self.fx.partition], ["--teacher", "adapter_config.json"]),
            (["--teacher", bad_brick], ["adapter_config.json", "r is 0"]),
            (["--teacher", brick], ["--teacher", brick, "brick.json"]),  # no manifest
        ]
        for args, names in cases:
            with self.subTest(args=args):
                self.assertRefused(self.train("train_exits.py", *args), "train_exits", *names)
        lines = {
            "not JSON": ('{"query": "q"\n', "line 1: not JSON"),
            "no document": ('{"query": "q", "document": "d"}\n{"query": "q"}\n',
                            "line 2: not an object with string query and document"),
            "empty": ("", "no pairs"),
            "not UTF-8": ('{"query": "\udcff"}\n', "--extra-pairs"),
        }
        for case, (text, message) in lines.items():
            with self.subTest(extra_pairs=case):
                with open(extra, "wb") as f:  # "\udcff" is written as the byte 0xff
                    f.write(text.encode("utf-8", "surrogateescape"))
                self.assertRefused(self.train("train_exits.py", "--extra-pairs", extra),
                                   "--extra-pairs", message)
        with open(extra, "w") as f:
            f.write('{"query": "q", "document": "d", "id": "x:1", "group": "x"}\n')
        self.assertPassedChecks(self.train("train_exits.py", "--extra-pairs", extra))
        # Training reads the train split, --eval the test split.
        os.remove(os.path.join(self.fx.sets, "py-docstring", "test.jsonl"))
        self.assertPassedChecks(self.train("train_exits.py"))
        self.assertRefused(self.train("train_exits.py", "--eval"),
                           "--sets", "py-docstring/test.jsonl")
        self.fx.write_config(num_hidden_layers=None)
        self.assertRefused(self.train("train_exits.py"), "config.json", "num_hidden_layers")

    def test_train_sparse_recovery(self):
        brick = self.fx.lora("bricks/ffn-recovery-50/3")
        rank16 = self.fx.lora("bricks/ffn-recovery-50/4", r=16, alpha=32)
        no_tensors = self.fx.lora("bricks/ffn-recovery-50/5")
        os.remove(os.path.join(no_tensors, "adapter_model.safetensors"))
        cases = [
            (["--fraction", "1"], ["--fraction", "(0, 1)"]),
            (["--fraction", "0"], ["--fraction"]),
            (["--fraction", "nan"], ["--fraction"]),
            (["--hidden-weight", "-1"], ["--hidden-weight"]),
            (["--hidden-weight", "nan"], ["--hidden-weight"]),
            (["--relation-weight", "-1"], ["--relation-weight"]),
            (["--relation-temperature", "0"], ["--relation-temperature"]),
            (["--relation-weight", "1", "--batch", "2"], ["--relation-weight needs --batch >= 4"]),
            (["--init", brick, "--full-weights"], ["--init", "--full-weights"]),
            (["--init", brick, "--eval-only", brick], ["--init", "--eval-only"]),
            (["--eval-per-task", "0"], ["--eval-per-task must be >= 1"]),
            (["--eval-fractions", "0.5,x"], ["--eval-fractions", "'x'"]),
            (["--eval-fractions", "1.5"], ["--eval-fractions", "'1.5'"]),
            (["--partition", brick], ["--partition", "ffn_partition.safetensors"]),
            (["--eval-only", self.fx.partition], ["--eval-only", "adapter_config.json"]),
            (["--init", rank16], ["adapter_config.json", "rank 16 alpha 32",
                                  "--rank 8 --alpha 16"]),
            (["--init", rank16, "--rank", "16"], ["rank 16 alpha 32", "--alpha 16"]),
            (["--init", no_tensors], ["--init", "no adapter_model.safetensors"]),
            (["--init", self.fx.model], ["--init", "adapter_config.json"]),
        ]
        for args, names in cases:
            with self.subTest(args=args):
                self.assertRefused(self.train("train_sparse_recovery.py", *args),
                                   "train_sparse_recovery", *names)
        self.assertPassedChecks(self.train("train_sparse_recovery.py", "--init", rank16,
                                           "--rank", "16", "--alpha", "32"))
        with open(os.path.join(brick, "adapter_config.json"), "w") as f:
            f.write("[8, 16]")
        self.assertRefused(self.train("train_sparse_recovery.py", "--init", brick),
                           "adapter_config.json", "not a JSON object")
        # It reads every task's splits: training all of them, --eval-only the test ones.
        os.remove(os.path.join(self.fx.sets, "man-synopsis", "train.jsonl"))
        self.assertRefused(self.train("train_sparse_recovery.py"),
                           "--sets", "man-synopsis/train.jsonl")
        self.assertPassedChecks(self.train("train_sparse_recovery.py", "--eval-only", rank16))


    def test_relufy(self):
        def run(*extra):
            return self.fx.run("relufy.py", "--model", self.fx.model, "--sets", self.fx.sets,
                               "--partition", self.fx.partition, "--out", self.out, *extra)
        self.assertPassedChecks(run())
        self.assertPassedChecks(run("--steps", "0", "--train-fraction", "0.5"))
        relu = os.path.join(self.tmp, "relu")
        os.makedirs(relu)
        with open(os.path.join(relu, "config.json"), "w") as f:
            json.dump({"max_position_embeddings": 512, "hidden_act": "relu"}, f)
        self.assertPassedChecks(run("--student", relu, "--mrr", "--steps", "0"))
        self.assertPassedChecks(run("--rank", "32", "--alpha", "16", "--rank-other-lr", "0.5"))
        for precision in ("fp32", "bf16", "auto"):
            self.assertPassedChecks(run("--precision", precision))
        result = run("--precision", "fp16")  # argparse's choices: exit 2, nothing written
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("--precision", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertFalse(os.path.exists(self.out))
        cases = [
            (["--steps", "-1"], ["--steps must be >= 0"]),
            (["--batch", "0"], ["--batch must be >= 1"]),
            (["--lr", "0"], ["--lr"]),
            (["--warmup", "2"], ["--warmup"]),
            (["--hidden-weight", "-1"], ["--hidden-weight"]),
            (["--hidden-weight", "nan"], ["--hidden-weight"]),
            (["--hidden-weight", "inf"], ["--hidden-weight", "finite"]),
            (["--train-fraction", "0"], ["--train-fraction"]),
            (["--train-fraction", "1.5"], ["--train-fraction"]),
            (["--threads", "0"], ["--threads must be >= 1"]),
            (["--eval-per-task", "0"], ["--eval-per-task must be >= 1"]),
            (["--eval-fractions", "0.5,x"], ["--eval-fractions", "'x'"]),
            (["--max-length", "513"], ["--max-length", "[2, 512]"]),
            (["--partition", self.fx.model], ["--partition", "ffn_partition.safetensors"]),
            (["--sets", os.path.join(self.tmp, "nowhere")], ["--sets"]),
            (["--mrr-fraction", "1"], ["--mrr-fraction"]),
            (["--rank", "-1"], ["--rank must be >= 0"]),
            (["--rank", "8", "--alpha", "-1"], ["--alpha"]),
            (["--rank", "8", "--rank-other-lr", "0"], ["--rank-other-lr"]),
            (["--student", self.fx.model], ["--student", "hidden_act is 'gelu', not 'relu'"]),
            (["--student", self.fx.partition], ["--student", "cannot read config.json"]),
        ]
        for extra, names in cases:
            with self.subTest(extra=extra):
                self.assertRefused(run(*extra), "relufy", *names)
        os.makedirs(self.out)
        result = run()
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn(f"{self.out} exists", result.stderr)
        self.assertPassedChecks(run("--force"))
        os.rmdir(self.out)
        self.fx.write_config(hidden_act="relu")
        self.assertRefused(run(), "config.json", "hidden_act is 'relu', not 'gelu'")

    def test_apply_relu_delta(self):
        q = "encoder.layer.0.attention.self.query"
        write_header(os.path.join(self.fx.model, "model.safetensors"),
                     {f"{q}.weight": [384, 384], f"{q}.bias": [384]})
        delta = os.path.join(self.tmp, "relu_delta.safetensors")
        write_header(delta, {f"{q}.a": [4, 384], f"{q}.b": [384, 4], f"{q}.bias": [384]})
        half = os.path.join(self.tmp, "half.safetensors")

        def run(*extra):
            return self.fx.run("apply_relu_delta.py", "--model", self.fx.model, "--delta", delta,
                               *extra)
        self.assertPassedChecks(run("--out", self.out))
        self.assertPassedChecks(run("--dtype", "f16", "--delta-out", half))
        for extra, names in [
                (["--out", self.out, "--delta", os.path.join(self.tmp, "none")],
                 ["--delta", "no such file"]),
                (["--out", self.out, "--dtype", "f16"], ["--dtype and --delta-out"]),
                (["--delta-out", half], ["--dtype and --delta-out"]),
                ([], ["nothing to do"]),
                (["--out", self.out, "--model", self.fx.partition], ["cannot read config.json"])]:
            with self.subTest(extra=extra):
                self.assertRefused(run(*extra), "apply_relu_delta", *names)
        self.fx.write_config(hidden_act="relu")
        self.assertRefused(run("--out", self.out), "hidden_act is 'relu', not 'gelu'")
        self.fx.write_config()
        os.makedirs(self.out)
        result = run("--out", self.out)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn(f"--out {self.out} exists", result.stderr)
        self.assertPassedChecks(run("--out", self.out, "--force"))
        os.rmdir(self.out)
        checked = run("--check")
        self.assertEqual(checked.returncode, 0, checked.stderr)
        self.assertIn(f"{delta} fits {self.fx.model}", checked.stderr)
        self.assertNotIn(BLOCKED, checked.stderr)
        for tensors, names in [
                ({}, ["holds no tensors"]),
                ({f"{q}.a": [4, 384]}, [f"{q}.a has no partner factor {q}.b"]),
                ({f"{q}.a": [4, 384], f"{q}.b": [1536, 4]},
                 [f"{q}.b [1536, 4] @ .a [4, 384] does not fit {q}.weight [384, 384]"]),
                ({f"{q}.a": [4, 384], f"{q}.b": [384, 8]}, ["does not fit"]),
                ({"encoder.layer.9.output.dense.a": [4, 1536],
                  "encoder.layer.9.output.dense.b": [384, 4]},
                 ["the model has no encoder.layer.9.output.dense.weight"]),
                ({"pooler.dense.bias": [384]}, ["pooler.dense.bias is not a tensor of the model"]),
                ({f"{q}.bias": [1536]}, [f"{q}.bias has shape [1536], the model's [384]"])]:
            with self.subTest(tensors=tensors):
                write_header(delta, tensors)
                for extra in (["--check"], ["--out", self.out]):
                    self.assertRefused(run(*extra), "apply_relu_delta", f"--delta {delta}",
                                       *names)
        open(delta, "wb").close()
        self.assertRefused(run("--check"), f"--delta {delta}: not a safetensors file")


class CheckFunctionsTest(unittest.TestCase):
    def test_valid_arguments(self):
        with tempfile.TemporaryDirectory() as tmp:
            fx = Fixture(tmp)
            ap = argparse.ArgumentParser()
            ta.add_training_args(ap)
            args = ap.parse_args(["--model", fx.model, "--sets", fx.sets])
            self.assertEqual((args.steps, args.batch, args.rank, args.alpha), (200, 32, 8, 16))
            config = ta.check_training_args("t", args, ["py-docstring", "deb-description"],
                                            ("train", "test"))
            self.assertEqual(config["num_hidden_layers"], 6)
            cfg = ta.check_lora_brick("t", "--init", fx.lora("b/1", r=4, alpha=8))
            self.assertEqual((cfg["r"], cfg["lora_alpha"]), (4, 8))
            ta.check_new_version("t", os.path.join(tmp, "b", "2"), False)
            ta.check_new_version("t", os.path.join(tmp, "b", "1"), True)
            with self.assertRaises(SystemExit):
                ta.check_new_version("t", os.path.join(tmp, "b", "1"), False)
            with open(os.path.join(fx.model, "config.json")) as f:
                self.assertEqual(json.load(f)["max_position_embeddings"], 512)


if __name__ == "__main__":
    unittest.main()
