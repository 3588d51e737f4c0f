#!/usr/bin/env python3
"""Drives `kiln embed` as a user would: texts on stdin, JSON lines out.

Run by ctest as: kiln_embed_test.py KILN_BINARY MODEL_DIR
Standard library only, so it runs on a machine without the tools/ venv.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

KILN = MODEL = None


def run(stdin: bytes, *flags: str):
    p = subprocess.run([KILN, "embed", f"--model={MODEL}", "--threads=2", *flags],
                       input=stdin, capture_output=True, timeout=300)
    lines = [json.loads(l) for l in p.stdout.decode().splitlines()]
    return p.returncode, lines, p.stderr.decode()


class KilnEmbedTest(unittest.TestCase):
    def test_one_json_object_per_line_at_full_depth(self):
        rc, out, err = run(b"hello world\nKiln serves bricks.\n")
        self.assertEqual(rc, 0, err)
        self.assertEqual(len(out), 2)
        self.assertEqual(out[0]["exit"], 6)
        self.assertEqual(out[0]["tokens"], 4)  # [CLS] hello world [SEP]
        self.assertFalse(out[0]["truncated"])
        self.assertEqual(len(out[0]["embedding"]), 384)
        self.assertAlmostEqual(math.sqrt(sum(x * x for x in out[0]["embedding"])), 1.0, places=5)
        self.assertNotEqual(out[0]["embedding"], out[1]["embedding"])

    def test_exit_flag_changes_the_embedding(self):
        _, full, _ = run(b"hello world\n")
        rc, early, err = run(b"hello world\n", "--exit=2")
        self.assertEqual(rc, 0, err)
        self.assertEqual(early[0]["exit"], 2)
        cos = sum(a * b for a, b in zip(full[0]["embedding"], early[0]["embedding"]))
        self.assertLess(cos, 0.999)

    def test_batching_does_not_change_results(self):
        text = b"a short one\n" + b"a much longer line of text that has more tokens in it\n" * 3
        _, batched, _ = run(text, "--batch_lines=64")
        _, single, _ = run(text, "--batch_lines=1")
        for a, b in zip(batched, single):
            self.assertLess(max(abs(x - y) for x, y in zip(a["embedding"], b["embedding"])), 1e-5)

    def test_bad_line_gives_error_and_the_next_line_is_still_embedded(self):
        rc, out, _ = run(b"first\n\xff\xfe broken\nthird\n")
        self.assertEqual(rc, 1)
        self.assertEqual(len(out), 3)
        self.assertIn("embedding", out[0])
        self.assertIn("error", out[1])
        self.assertIn("line 2", out[1]["error"])
        self.assertIn("UTF-8", out[1]["error"])
        self.assertIn("embedding", out[2])

    def test_long_input_is_truncated_to_max_seq_length(self):
        rc, out, err = run(("word " * 600).encode() + b"\n")
        self.assertEqual(rc, 0, err)
        self.assertEqual(out[0]["tokens"], 256)
        self.assertTrue(out[0]["truncated"])

    def test_empty_line_embeds_the_empty_text(self):
        rc, out, err = run(b"\n")
        self.assertEqual(rc, 0, err)
        self.assertEqual(out[0]["tokens"], 2)

    def test_exit_out_of_range_is_a_usage_error(self):
        rc, out, err = run(b"x\n", "--exit=7")
        self.assertEqual(rc, 2)
        self.assertEqual(out, [])
        self.assertIn("--exit=7: exit_layer: 7 is out of range 0..6", err)

    def test_bad_model_folder_names_the_missing_file(self):
        with tempfile.TemporaryDirectory() as d:
            for f in ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json",
                      "modules.json", "sentence_bert_config.json"):
                shutil.copy(os.path.join(MODEL, f), d)
            shutil.copytree(os.path.join(MODEL, "1_Pooling"), os.path.join(d, "1_Pooling"))
            p = subprocess.run([KILN, "embed", f"--model={d}"], input=b"x\n",
                               capture_output=True, timeout=60)
            self.assertEqual(p.returncode, 2)
            self.assertIn("model.safetensors", p.stderr.decode())

    def test_unknown_subcommand_is_a_usage_error(self):
        p = subprocess.run([KILN, "frobnicate"], capture_output=True, timeout=60)
        self.assertEqual(p.returncode, 2)
        self.assertIn("unknown subcommand 'frobnicate'", p.stderr.decode())


class KilnServeFlagsTest(unittest.TestCase):
    """`kiln serve` refuses bad flags and a bad model folder before serving."""

    def serve(self, *flags):
        return subprocess.run([KILN, "serve", "--port=0", "--metrics_port=0", *flags],
                              capture_output=True, timeout=120)

    def test_bad_flags_exit_2_naming_the_flag(self):
        for flag, message in [("--port=70000", "--port=70000 is not a port"),
                              ("--max_client_batch=0", "--max_client_batch must be >= 1"),
                              ("--max_queue_requests=0", "--max_queue_requests must be >= 1"),
                              ("--drain_timeout_s=-1", "--drain_timeout_s must be >= 0")]:
            p = self.serve(f"--model={MODEL}", flag)
            self.assertEqual(p.returncode, 2, flag)
            self.assertIn(message, p.stderr.decode(), flag)

    def test_bad_routing_and_ffn_flags_exit_2_naming_the_flag(self):
        for flag, message in [("--default_routing=maybe", "--default_routing=maybe is not"),
                              ("--ffn_partition=ffn-e16", "--ffn_partition needs --brick_dir")]:
            p = self.serve(f"--model={MODEL}", flag)
            self.assertEqual(p.returncode, 2, flag)
            self.assertIn(message, p.stderr.decode(), flag)
        # Router flags are checked once the brick store is open.
        bricks = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))), "deploy", "bricks")
        for flag, message in [("--router_exit=7",
                               "--router_exit=7 is not an exit of the model; allowed: 1, 2, 3, 4, 5, 6"),
                              ("--router_top_k=0", "--router_top_k: 0 must be at least 1"),
                              ("--router_min_score=2", "--router_min_score: 2 is not a cosine"),
                              ("--router_temperature=0", "--router_temperature: 0 must be > 0"),
                              ("--router_cache_entries=0", "--router_cache_entries: 0"),
                              ("--ffn_partition=ffn-e16@0",
                               "--ffn_partition \"ffn-e16@0\": the version after '@' must be a "
                               "positive integer")]:
            p = self.serve(f"--model={MODEL}", f"--brick_dir={bricks}", "--admin_port=0", flag)
            self.assertEqual(p.returncode, 2, flag)
            self.assertIn(message, p.stderr.decode(), flag)

    def test_bad_device_flags_exit_2_naming_the_flag(self):
        for flag, message in [("--device=gpu", "--device: device 'gpu' is not one of auto, cpu, cuda"),
                              ("--gemm_precision=int8", "--gemm_precision: GEMM precision 'int8'"),
                              ("--cuda_device=-1", "--cuda_device must be >= 0")]:
            p = self.serve(f"--model={MODEL}", flag)
            self.assertEqual(p.returncode, 2, flag)
            self.assertIn(message, p.stderr.decode(), flag)
            e = subprocess.run([KILN, "embed", f"--model={MODEL}", flag], input=b"x\n",
                               capture_output=True, timeout=120)
            self.assertEqual(e.returncode, 2, flag)
            self.assertIn(message, e.stderr.decode(), flag)

    def test_device_cuda_without_a_usable_gpu_is_a_start_up_error(self):
        e = subprocess.run([KILN, "embed", f"--model={MODEL}", "--device=cuda"], input=b"x\n",
                           capture_output=True, timeout=120)
        if e.returncode == 0:
            self.skipTest("a usable CUDA device is present")
        self.assertEqual(e.returncode, 1)
        self.assertIn("--device=cuda: no usable CUDA device: ", e.stderr.decode())
        p = self.serve(f"--model={MODEL}", "--device=cuda")
        self.assertEqual(p.returncode, 1)
        self.assertIn("--device=cuda: no usable CUDA device: ", p.stderr.decode())

    def test_bad_model_folder_exits_2_naming_it(self):
        p = self.serve("--model=/nonexistent/kiln-model")
        self.assertEqual(p.returncode, 2)
        self.assertIn("/nonexistent/kiln-model", p.stderr.decode())


if __name__ == "__main__":
    KILN, MODEL = sys.argv[1], sys.argv[2]
    del sys.argv[1:3]
    unittest.main(verbosity=2)
