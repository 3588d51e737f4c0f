#!/usr/bin/env python3
"""Drives kiln_bench_sparse_ffn as bench/sparse_ffn.sh does, on a few texts:
its flag errors (exit 2, naming the flag) and its --reference_model column.
Timings are not checked (a bench's numbers are not a test's); what is checked
is that the bench refuses what it cannot measure and that its cosines mean
what they say.

Run by ctest as: sparse_ffn_bench_cli_test.py BENCH_BINARY REPO_ROOT
Standard library only.
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

BENCH = ROOT = None
TEXTS = ["Return the list of files in a directory.",
         "def listdir(path): return os.listdir(path)",
         "copy files and directories",
         "a small, fast HTTP server with reverse proxy support"]


def bench(*flags):
    p = subprocess.run([BENCH, f"--model={ROOT}/models/all-MiniLM-L6-v2",
                        f"--partition={ROOT}/deploy/bricks/ffn-e16/3", "--threads=1", *flags],
                       capture_output=True, timeout=600)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def rows(stdout):
    """The JSON line of each fraction, in order."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"measure"')]


class SparseFfnBenchCliTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.texts = os.path.join(self.tmp.name, "texts.txt")
        with open(self.texts, "w") as f:
            f.write("\n".join(TEXTS) + "\n")

    def tearDown(self):
        self.tmp.cleanup()

    def test_reference_model_column(self):
        # The model as its own reference: each fraction's cosine to the
        # reference's dense embedding is its cosine to its own dense one.
        rc, out, err = bench(f"--input={self.texts}", "--rounds=1", "--fractions=1,0.5",
                             f"--reference_model={ROOT}/models/all-MiniLM-L6-v2")
        self.assertEqual(rc, 0, err)
        self.assertIn("ref_mean_cosine", out)
        got = rows(out)
        self.assertEqual([r["fraction"] for r in got], [1, 0.5])
        self.assertAlmostEqual(got[0]["ref_mean_cosine"], 1.0, places=4)
        self.assertLess(got[1]["mean_cosine"], 0.9999)  # the fraction applied
        for r in got:
            self.assertAlmostEqual(r["ref_mean_cosine"], r["mean_cosine"], places=4)
        self.assertEqual(got[1]["experts"], 8)
        self.assertEqual(got[1]["of"], 16)

        # Without the flag there is no such column.
        rc, out, err = bench(f"--input={self.texts}", "--rounds=1", "--fractions=1,0.5")
        self.assertEqual(rc, 0, err)
        self.assertNotIn("ref_mean_cosine", out)
        self.assertEqual([r["fraction"] for r in rows(out)], [1, 0.5])

    def test_reference_model_errors_name_the_flag(self):
        missing = os.path.join(self.tmp.name, "no-model")
        tiny = os.path.join(ROOT, "tests", "engine", "testdata", "mose-tiny")  # its embeddings have 64 dimensions
        for flag, fragments in [
                (f"--reference_model={missing}", ["--reference_model: ", missing]),
                (f"--reference_model={tiny}",
                 ["--reference_model", "embeddings of 64 dimensions, --model's have 384"])]:
            rc, out, err = bench(f"--input={self.texts}", "--rounds=1", "--fractions=1,0.5", flag)
            self.assertEqual(rc, 2, (flag, err))
            for fragment in fragments:
                self.assertIn(fragment, err, flag)
            self.assertEqual(rows(out), [], flag)  # nothing measured

    def test_flag_errors_exit_2(self):
        empty = os.path.join(self.tmp.name, "empty.txt")
        open(empty, "w").close()
        for flags, fragment in [
                (["--fractions=1,half"], '--fractions: "half" is not a number in (0, 1]'),
                (["--fractions=1,0"], '--fractions: "0" is not a number in (0, 1]'),
                (["--fractions=1,1.5"], '--fractions: "1.5"'),
                (["--fractions=nan"], '--fractions: "nan"'),
                (["--rounds=0"], "--rounds must be at least 1, got 0"),
                (["--max_batch_tokens=0"], "--max_batch_tokens must be at least 1"),
                ([f"--input={empty}"], f"--input {empty} holds no texts")]:
            args = [f"--input={self.texts}", *flags] if not flags[0].startswith("--input") else flags
            rc, out, err = bench(*args)
            self.assertEqual(rc, 2, (flags, err))
            self.assertIn(fragment, err, flags)
            self.assertEqual(rows(out), [], flags)


if __name__ == "__main__":
    BENCH, ROOT = sys.argv[1], sys.argv[2]
    unittest.main(argv=sys.argv[:1])
