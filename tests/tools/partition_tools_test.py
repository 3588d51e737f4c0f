#!/usr/bin/env python3
"""Tests of the partition-making tools' argument checks
(tools/calibration_args.py and the tools that use it: calibrate_ffn_fill.py,
fit_router_keys.py, coactivation_partition.py), and of rebase_partition.py,
which needs no PyTorch and is run to the end. Standard library only.

Each case runs a tool as a user would, with PyTorch and the packages
around it blocked (tool_harness.Fixture): a bad argument must be refused
(exit 1, the flag or file named, no traceback) before any of them loads,
and nothing written; valid arguments must get as far as the first of them.

Run from the repo root: python3 tests/tools/partition_tools_test.py
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
import calibration_args as ca  # noqa: E402  (tool_harness put tools/ on the path)


class ToolRefusalTest(ToolTestCase):
    def setUp(self):
        super().setUp()
        self.out = os.path.join(self.tmp, "new", "ffn-e16", "5")
        self.written = os.path.dirname(self.out)

    def common(self):
        return ["--model", self.fx.model, "--sets", self.fx.sets]

    def derived(self, tool, *extra):
        """A derived-partition tool's run with valid arguments but extra."""
        args = self.common() + ["--partition", self.fx.partition, "--out", self.out]
        return self.fx.run(tool, *args, *extra)

    def test_valid_arguments_reach_pytorch(self):
        for tool in ("calibrate_ffn_fill.py", "fit_router_keys.py"):
            with self.subTest(tool=tool):
                self.assertPassedChecks(self.derived(tool))
        self.assertPassedChecks(self.fx.run(
            "coactivation_partition.py", *self.common(), "--out", self.out,
            "--kiln", self.fx.kiln, "--per-task", "1"))

    def test_base_model_follows_the_model(self):
        # Computed on the partition's own model: base_model stays as it is.
        for tool in ("calibrate_ffn_fill.py", "fit_router_keys.py"):
            with self.subTest(tool=tool, model="same"):
                result = self.derived(tool)
                self.assertPassedChecks(result)
                self.assertNotIn("base_model:", result.stderr)
        # On a ReLU-fied copy (another config.json, so another fingerprint):
        # the new version is that model's brick, and the tool says so.
        self.fx.write_config(hidden_act="relu")
        for tool in ("calibrate_ffn_fill.py", "fit_router_keys.py"):
            with self.subTest(tool=tool, model="relu"):
                result = self.derived(tool)
                self.assertPassedChecks(result)
                self.assertIn("base_model: model -> model (fingerprint", result.stderr)
        # No readable weights: refused, naming the file.
        os.remove(os.path.join(self.fx.model, "model.safetensors"))
        for tool in ("calibrate_ffn_fill.py", "fit_router_keys.py"):
            with self.subTest(tool=tool, model="no weights"):
                self.assertRefused(self.derived(tool), "model.safetensors", "--model")

    def test_shared_flags(self):
        cases = [
            (["--eval-fractions", "0.5,x"], ["--eval-fractions", "'x'"]),
            (["--eval-fractions", "0.5,1.5"], ["--eval-fractions", "'1.5'"]),
            (["--eval-fractions", "nan"], ["--eval-fractions", "'nan'"]),
            (["--eval-fractions", "0"], ["--eval-fractions", "'0'"]),
            (["--threads", "0"], ["--threads"]),
            (["--max-length", "1"], ["--max-length", "[2, 512]"]),
            (["--max-length", "513"], ["--max-length", "[2, 512]"]),
            (["--eval-per-task", "0"], ["--eval-per-task"]),
        ]
        for tool in ("calibrate_ffn_fill.py", "fit_router_keys.py"):
            for extra, names in cases:
                with self.subTest(tool=tool, extra=extra):
                    self.assertRefused(self.derived(tool, *extra), tool[:-3], *names)

    def test_model_and_sets(self):
        missing = os.path.join(self.tmp, "nowhere")
        for tool in ("calibrate_ffn_fill.py", "fit_router_keys.py"):
            with self.subTest(tool=tool, flag="--model"):
                self.assertRefused(self.derived(tool, "--model", missing),
                                   "--model", missing, "config.json")
            with self.subTest(tool=tool, flag="--sets"):
                self.assertRefused(self.derived(tool, "--sets", missing),
                                   "--sets", "py-docstring/train.jsonl")
        with open(os.path.join(self.fx.model, "config.json"), "w") as f:
            json.dump({"max_position_embeddings": None, "intermediate_size": 1536}, f)
        self.assertRefused(self.derived("fit_router_keys.py"), "config.json",
                           "max_position_embeddings")
        with open(os.path.join(self.fx.model, "config.json"), "w") as f:
            f.write("{not json")
        self.assertRefused(self.derived("fit_router_keys.py"), "--model", "config.json")
        with open(os.path.join(self.fx.model, "config.json"), "w") as f:
            f.write("[512]")
        self.assertRefused(self.derived("calibrate_ffn_fill.py"), "config.json",
                           "not a JSON object")
        with open(os.path.join(self.fx.model, "config.json"), "w") as f:
            json.dump({"max_position_embeddings": 512, "intermediate_size": 1536}, f)
        os.remove(os.path.join(self.fx.sets, "deb-description", "test.jsonl"))
        self.assertRefused(self.derived("fit_router_keys.py"),
                           "--sets", "deb-description/test.jsonl")

    def test_partition_and_out(self):
        lora = self.fx.brick("lora", "lora/3")
        no_manifest = os.path.join(self.tmp, "bare", "3")
        os.makedirs(no_manifest)
        open(os.path.join(no_manifest, "ffn_partition.safetensors"), "wb").close()
        for tool in ("calibrate_ffn_fill.py", "fit_router_keys.py"):
            with self.subTest(tool=tool, case="kind"):
                self.assertRefused(self.derived(tool, "--partition", lora),
                                   os.path.join(lora, "brick.json"), "kind is 'lora'")
            with self.subTest(tool=tool, case="brick.json not JSON"):
                with open(os.path.join(no_manifest, "brick.json"), "w") as f:
                    f.write("{kind:")
                self.assertRefused(self.derived(tool, "--partition", no_manifest),
                                   os.path.join(no_manifest, "brick.json"))
                os.remove(os.path.join(no_manifest, "brick.json"))
            with self.subTest(tool=tool, case="no brick.json"):
                self.assertRefused(self.derived(tool, "--partition", no_manifest),
                                   os.path.join(no_manifest, "brick.json"), "--partition")
            with self.subTest(tool=tool, case="out not a version"):
                self.assertRefused(self.derived(tool, "--out", self.out + "x"),
                                   "--out", self.out + "x")
            with self.subTest(tool=tool, case="out exists"):
                result = self.derived(tool, "--out", lora)
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertIn(f"{lora} exists", result.stderr)
                self.assertIn("--force", result.stderr)
            with self.subTest(tool=tool, case="out exists, --force"):
                self.assertPassedChecks(self.derived(tool, "--out", lora, "--force"))
            with self.subTest(tool=tool, case="out exists, --force, no partition"):
                nowhere = os.path.join(self.tmp, "no-partition", "2")
                self.assertRefused(self.derived(tool, "--partition", nowhere, "--out", lora,
                                                "--force"), nowhere, "--partition")
            with self.subTest(tool=tool, case="out is the partition, --force"):
                result = self.derived(tool, "--out", self.fx.partition + "/", "--force")
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertIn("is --partition itself", result.stderr)
                self.assertNotIn(BLOCKED, result.stderr)

    def test_own_flags(self):
        self.assertRefused(self.derived("calibrate_ffn_fill.py", "--fraction", "1"),
                           "--fraction")
        self.assertRefused(self.derived("calibrate_ffn_fill.py", "--per-task", "0"),
                           "--per-task")
        self.assertRefused(self.derived("fit_router_keys.py", "--ridge", "0"), "--ridge")
        self.assertRefused(self.derived("fit_router_keys.py", "--ridge", "nan"), "--ridge")
        self.assertRefused(self.derived("fit_router_keys.py", "--per-task", "0"),
                           "--per-task")

    def test_coactivation_partition(self):
        base = self.common() + ["--out", self.out, "--kiln", self.fx.kiln, "--per-task", "1"]
        cases = [
            (["--per-task", "2"], ["no train pairs after the first 2", "--candidates"]),
            (["--out", self.fx.partition], [f"{self.fx.partition} exists", "--force"]),
            (["--experts", "0"], ["--experts must be >= 1"]),
            (["--tokens", "0"], ["--tokens must be >= 1"]),
            (["--candidates", "0"], ["--candidates must be >= 1"]),
            (["--select-per-task", "0"], ["--select-per-task must be >= 1"]),
            (["--experts", "7"], ["--experts 7 does not divide the FFN width 1536"]),
            (["--select-fraction", "1"], ["--select-fraction"]),
            (["--seed", "-1"], ["--seed"]),
            (["--out", os.path.join(self.tmp, "v1")], ["--out must end in a version"]),
            (["--out", "3"], ["--out must be <brick_dir>/<id>/<version>"]),
            (["--kiln", self.fx.model], ["--kiln", "not an executable"]),
            (["--eval-fractions", "2"], ["--eval-fractions"]),
        ]
        for extra, names in cases:
            with self.subTest(extra=extra):
                self.assertRefused(self.fx.run("coactivation_partition.py", *base, *extra),
                                   "coactivation_partition", *names)
        with open(os.path.join(self.fx.model, "config.json"), "w") as f:
            json.dump({"max_position_embeddings": 512}, f)
        self.assertRefused(self.fx.run("coactivation_partition.py", *base), "config.json",
                           "no intermediate_size")
        with open(os.path.join(self.fx.model, "config.json"), "w") as f:
            json.dump({"max_position_embeddings": 512, "intermediate_size": 1536}, f)
        # One candidate needs no pairs beyond the calibration ones.
        self.assertPassedChecks(self.fx.run("coactivation_partition.py", *base, "--per-task",
                                            "2", "--candidates", "1"))


def safetensors_bytes(tensors):
    """A safetensors file, built by hand: {name: (dtype, shape, raw bytes)}."""
    header, offset, data = {}, 0, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def read_safetensors(path):
    """{name: (dtype, shape, raw bytes)} of a safetensors file, read by hand."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    return {name: (e["dtype"], e["shape"], data[e["data_offsets"][0]:e["data_offsets"][1]])
            for name, e in header.items() if name != "__metadata__"}


class RebasePartitionTest(ToolTestCase):
    """tools/rebase_partition.py on a two-layer model of 4 neurons (2 groups
    of 2, keys of 3 floats) with a fill, rebased onto a ReLU-fied copy."""

    def setUp(self):
        super().setUp()
        self.fx.write_config(num_hidden_layers=2, intermediate_size=4, hidden_size=3,
                             hidden_act="relu")
        self.tensors = {}
        for layer in range(2):
            self.tensors[f"layer.{layer}.groups"] = (
                "I32", [2, 2], struct.pack("<4i", *([1, 3, 0, 2] if layer else [0, 1, 2, 3])))
            self.tensors[f"layer.{layer}.centroids"] = (
                "F32", [2, 3], struct.pack("<6f", *[layer + i / 8 for i in range(6)]))
            self.tensors[f"layer.{layer}.fill"] = (
                "F32", [4], struct.pack("<4f", 0.5, -0.25, 0.125, layer))
        with open(os.path.join(self.fx.partition, "ffn_partition.safetensors"), "wb") as f:
            f.write(safetensors_bytes(self.tensors))
        manifest_path = os.path.join(self.fx.partition, "brick.json")
        with open(manifest_path) as f:
            manifest = json.load(f)
        manifest["description"] = "Groups by k-means. Fill: calibrated on the GELU model."
        with open(manifest_path, "w") as f:
            json.dump(manifest, f)
        self.out = os.path.join(self.tmp, "relu-bricks", "ffn-e16", "1")
        self.written = os.path.dirname(os.path.dirname(self.out))

    def rebase(self, *extra):
        return self.fx.run("rebase_partition.py", "--model", self.fx.model,
                           "--partition", self.fx.partition, "--out", self.out, *extra)

    def manifest(self):
        with open(os.path.join(self.out, "brick.json")) as f:
            return json.load(f)

    def test_the_new_version_is_the_models_brick(self):
        result = self.rebase()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("fill kept", result.stderr)
        m = self.manifest()
        self.assertEqual(m["version"], 1)
        self.assertEqual(m["kind"], "ffn_partition")
        self.assertEqual(m["base_model"],
                         {"name": "model", "fingerprint": ca.fingerprint(self.fx.model)})
        # The source was made for the GELU config: another fingerprint.
        with open(os.path.join(self.fx.partition, "brick.json")) as f:
            source = json.load(f)
        self.assertNotEqual(ca.fingerprint(self.fx.model), source["base_model"]["fingerprint"])
        self.assertEqual(read_safetensors(os.path.join(self.out, "ffn_partition.safetensors")),
                         self.tensors)
        self.assertTrue(m["description"].startswith("For model (rebased from model by "
                                                    "rebase_partition). Groups by k-means."),
                        m["description"])

    def test_on_the_partitions_own_model_base_model_stays(self):
        manifest_path = os.path.join(self.fx.partition, "brick.json")
        with open(manifest_path) as f:
            manifest = json.load(f)
        manifest["base_model"] = {"name": "minilm", "fingerprint": ca.fingerprint(self.fx.model)}
        with open(manifest_path, "w") as f:
            json.dump(manifest, f)
        result = self.rebase()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("base_model:", result.stderr)
        self.assertEqual(self.manifest()["base_model"], manifest["base_model"])
        self.assertEqual(self.manifest()["description"], manifest["description"])

    def test_drop_fill_keeps_groups_and_keys_only(self):
        result = self.rebase("--drop-fill")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("fill dropped", result.stderr)
        got = read_safetensors(os.path.join(self.out, "ffn_partition.safetensors"))
        self.assertEqual(got, {k: v for k, v in self.tensors.items() if not k.endswith(".fill")})
        description = self.manifest()["description"]
        self.assertTrue(description.endswith("Groups by k-means. No fill "
                                             "(tools/rebase_partition.py --drop-fill)."),
                        description)
        self.assertNotIn("calibrated", description)

    def test_refusals(self):
        # A model of other shapes: refused naming its config.json, the
        # partition and the tensor that does not fit.
        self.fx.write_config(num_hidden_layers=2, intermediate_size=8, hidden_size=3)
        self.assertRefused(self.rebase(), "config.json", "intermediate_size 8",
                           "ffn_partition.safetensors", "layer.0.groups of shape [2, 2]",
                           "layer.0.fill of shape [4]")
        self.fx.write_config(num_hidden_layers=3, intermediate_size=4, hidden_size=3)
        self.assertRefused(self.rebase(), "num_hidden_layers 3", "groups for layers [0, 1]")
        self.fx.write_config(num_hidden_layers=2, intermediate_size=4, hidden_size=5)
        self.assertRefused(self.rebase(), "hidden_size 5", "layer.1.centroids of shape [2, 3]")
        self.fx.write_config(num_hidden_layers=2, intermediate_size=4, hidden_size=3,
                             hidden_act="relu")
        path = os.path.join(self.fx.partition, "ffn_partition.safetensors")
        # A groups tensor that is a scalar: refused naming it.
        with open(path, "wb") as f:
            f.write(safetensors_bytes({**self.tensors,
                                       "layer.1.groups": ("I32", [], struct.pack("<i", 0))}))
        self.assertRefused(self.rebase(), "layer.1.groups of shape []")
        # A partition whose data is cut short: refused naming the file.
        with open(path, "wb") as f:
            f.write(safetensors_bytes(self.tensors)[:-4])
        self.assertRefused(self.rebase(), "ffn_partition.safetensors", "data_offsets")
        # An existing --out without --force.
        with open(path, "wb") as f:
            f.write(safetensors_bytes(self.tensors))
        os.makedirs(self.out)
        result = self.rebase()
        self.assertEqual(result.returncode, 1)
        self.assertIn("exists", result.stderr)
        self.assertEqual(self.rebase("--force").returncode, 0)


class CheckFunctionsTest(unittest.TestCase):
    def test_valid_arguments(self):
        with tempfile.TemporaryDirectory() as tmp:
            fx = Fixture(tmp)
            args = argparse.Namespace(model=fx.model, sets=fx.sets, max_length=128,
                                      eval_per_task=40, eval_fractions="0.75,0.5,1",
                                      threads=2)
            config = ca.check_calibration_args("t", args)
            self.assertEqual(args.eval_fractions, [0.75, 0.5, 1.0])
            self.assertEqual(config["intermediate_size"], 1536)
            out = os.path.join(tmp, "ffn-e16", "12")
            src, manifest = ca.derived_partition("t", fx.partition, out, False)
            self.assertEqual(src, os.path.join(fx.partition, "ffn_partition.safetensors"))
            self.assertEqual(manifest["version"], 12)
            self.assertEqual(manifest["kind"], "ffn_partition")
            self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
    unittest.main()
