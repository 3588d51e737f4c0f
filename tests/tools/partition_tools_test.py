#!/usr/bin/env python3
"""Tests of the partition-making tools' argument checks
(tools/calibration_args.py and the tools that use it: calibrate_ffn_fill.py,
fit_router_keys.py, coactivation_partition.py). Standard library only.

Each case runs a tool as a user would, with PyTorch and the packages
around it blocked (tool_harness.Fixture): a bad argument must be refused
(exit 1, the flag or file named, no traceback) before any of them loads,
and nothing written; valid arguments must get as far as the first of them.

Run from the repo root: python3 tests/tools/partition_tools_test.py
"""
import argparse
import json
import os
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
