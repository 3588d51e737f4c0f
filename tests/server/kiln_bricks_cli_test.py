#!/usr/bin/env python3
"""Drives `kiln bricks split-ffn` as a user would and checks its exit codes.

Run by ctest as: kiln_bricks_cli_test.py KILN_BINARY MODEL_DIR
Standard library only, so it runs on a machine without the tools/ venv.
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest

KILN = MODEL = None


def split_ffn(*flags: str):
    p = subprocess.run([KILN, "bricks", "split-ffn", *flags], capture_output=True, timeout=600)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def safetensors_header(path: str) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def write_features(path: str, tensors: dict) -> None:
    """A safetensors file of {name: (dtype, shape, raw little-endian bytes)}."""
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _, _, data in tensors.values():
            f.write(data)


def read_tensor(path: str, name: str):
    """(dtype, shape, raw bytes) of tensor `name` in a safetensors file."""
    header = safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin, end = header[name]["data_offsets"]
        f.seek(8 + n + begin)
        return header[name]["dtype"], header[name]["shape"], f.read(end - begin)


class KilnBricksCliTest(unittest.TestCase):
    def setUp(self):
        self.out = tempfile.mkdtemp(prefix="kiln_bricks_cli_")

    def tearDown(self):
        shutil.rmtree(self.out, ignore_errors=True)

    def test_split_ffn_writes_the_brick_and_reports_iterations(self):
        rc, out, err = split_ffn(f"--model={MODEL}", "--experts=8", f"--out={self.out}",
                                 "--seed=3", "--version", "2")
        self.assertEqual(rc, 0, err)
        version_dir = os.path.join(self.out, "ffn-e8", "2")
        with open(os.path.join(version_dir, "brick.json")) as f:
            manifest = json.load(f)
        self.assertEqual(manifest["id"], "ffn-e8")
        self.assertEqual(manifest["version"], 2)
        self.assertEqual(manifest["kind"], "ffn_partition")
        self.assertEqual(manifest["instructions"], {"query": [], "document": []})
        self.assertIn("8 experts", manifest["description"])
        self.assertIn("seed 3", manifest["description"])
        self.assertRegex(manifest["base_model"]["fingerprint"], r"^[0-9a-f]{64}$")
        header = safetensors_header(os.path.join(version_dir, "ffn_partition.safetensors"))
        self.assertEqual(header["layer.5.groups"]["dtype"], "I32")
        self.assertEqual(header["layer.5.groups"]["shape"], [8, 192])
        self.assertEqual(header["layer.0.centroids"]["dtype"], "F32")
        self.assertEqual(header["layer.0.centroids"]["shape"], [8, 384])
        self.assertEqual(len([k for k in header if k != "__metadata__"]), 12)
        self.assertIn("layer 5: balanced k-means", out)
        self.assertIn("iteration", out)
        self.assertIn("wrote " + os.path.join(version_dir, "ffn_partition.safetensors"), out)

        # A published version is never overwritten.
        rc, _, err = split_ffn(f"--model={MODEL}", "--experts=8", f"--out={self.out}",
                               "--version=2")
        self.assertEqual(rc, 2)
        self.assertIn("--version", err)
        self.assertIn("already holds a brick", err)

    def test_experts_that_do_not_divide_the_ffn_width_exit_2(self):
        rc, _, err = split_ffn(f"--model={MODEL}", "--experts=7", f"--out={self.out}")
        self.assertEqual(rc, 2)
        self.assertIn("--experts: 7 does not divide the FFN width 1536", err)
        self.assertEqual(os.listdir(self.out), [])

    def test_missing_or_bad_flags_exit_2_naming_them(self):
        rc, _, err = split_ffn(f"--out={self.out}")
        self.assertEqual(rc, 2)
        self.assertIn("--model: required", err)
        self.assertIn("Usage:", err)
        for flag, fragment in [("--experts=0", "--experts: must be a positive integer"),
                               ("--experts=x", "--experts: must be a positive integer"),
                               ("--seed=-1", "--seed"),
                               ("--id=Bad", "--id: must match"),
                               ("--bogus=1", "--bogus: unknown flag")]:
            rc, _, err = split_ffn(f"--model={MODEL}", f"--out={self.out}", flag)
            self.assertEqual(rc, 2, flag)
            self.assertIn(fragment, err)
        rc, _, err = split_ffn(f"--model={MODEL}")
        self.assertEqual(rc, 2)
        self.assertIn("--out: required", err)

    def test_bad_model_folder_exits_2_naming_the_file(self):
        rc, _, err = split_ffn(f"--model={self.out}/nope", f"--out={self.out}")
        self.assertEqual(rc, 2)
        self.assertIn("nope", err)

    def test_model_without_ffn_weights_exits_2_naming_the_tensor(self):
        # A model folder whose config reads, but whose weights file lacks
        # the FFN input weights: the user's input, not a crash or a 1.
        model = os.path.join(self.out, "model")
        shutil.copytree(MODEL, model, ignore=shutil.ignore_patterns("model.safetensors", "*.onnx"))
        weights = os.path.join(model, "model.safetensors")
        write_features(weights, {"embeddings.LayerNorm.weight": ("F32", [384], bytes(384 * 4))})
        rc, out, err = split_ffn(f"--model={model}", f"--out={self.out}")
        self.assertEqual(rc, 2, out + err)
        self.assertIn(weights, err)
        self.assertIn("intermediate.dense.weight", err)
        self.assertFalse(os.path.exists(os.path.join(self.out, "ffn-e16")))

    def test_weight_rows_as_features_give_the_plain_split_and_bad_ones_exit_2(self):
        # The FFN input weights themselves as the features: the same rows,
        # so the same groups and keys, byte for byte, as without --features.
        weights = os.path.join(MODEL, "model.safetensors")
        names = {i: f"encoder.layer.{i}.intermediate.dense.weight" for i in range(6)}
        if names[0] not in safetensors_header(weights):
            names = {i: "bert." + name for i, name in names.items()}
        features = os.path.join(self.out, "acts.safetensors")
        write_features(features, {f"layer.{i}.features": read_tensor(weights, name)
                                  for i, name in names.items()})
        rc, _, err = split_ffn(f"--model={MODEL}", "--experts=8", f"--out={self.out}")
        self.assertEqual(rc, 0, err)
        rc, out, err = split_ffn(f"--model={MODEL}", "--experts=8", f"--out={self.out}",
                                 "--version=2", f"--features={features}",
                                 "--description=test split")
        self.assertEqual(rc, 0, err)
        self.assertIn("clustering the rows of " + features, out)
        plain, by_features = (os.path.join(self.out, "ffn-e8", v) for v in ("1", "2"))
        with open(os.path.join(by_features, "brick.json")) as f:
            self.assertEqual(json.load(f)["description"], "test split")
        with open(os.path.join(plain, "ffn_partition.safetensors"), "rb") as a, \
                open(os.path.join(by_features, "ffn_partition.safetensors"), "rb") as b:
            self.assertEqual(a.read(), b.read())

        bad = os.path.join(self.out, "bad.safetensors")
        write_features(bad, {f"layer.{i}.features": ("F32", [1024, 2], bytes(1024 * 2 * 4))
                             for i in range(6)})
        for flag, fragment in [(f"--features={self.out}/none", "--features: "),
                               (f"--features={bad}", "has 1024 rows, expected one per FFN neuron"),
                               ("--features=", "--features: needs a file name"),
                               ("--description=", "--description: must not be empty")]:
            rc, _, err = split_ffn(f"--model={MODEL}", f"--out={self.out}", flag)
            self.assertEqual(rc, 2, flag)
            self.assertIn(fragment, err)
        self.assertFalse(os.path.exists(os.path.join(self.out, "ffn-e16")))

    def test_unknown_subcommand_exits_2(self):
        p = subprocess.run([KILN, "bricks", "frobnicate"], capture_output=True, timeout=60)
        self.assertEqual(p.returncode, 2)
        self.assertIn("unknown subcommand 'frobnicate'", p.stderr.decode())


if __name__ == "__main__":
    KILN, MODEL = sys.argv[1], sys.argv[2]
    unittest.main(argv=sys.argv[:1])
