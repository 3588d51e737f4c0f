#!/usr/bin/env python3
"""Prints the base-model fingerprint that a brick.json must carry.

The fingerprint is defined in docs/BRICKS.md ("Base-model fingerprint"): the
lowercase hex SHA-256 of
  1. the bytes of <model_dir>/config.json, exactly as on disk; then
  2. for every tensor in <model_dir>/model.safetensors (not the
     "__metadata__" entry), in ascending byte order of the tensor name, one
     line "<name>\\t<dtype>\\t<d0>,<d1>,...\\n" (dtype as the header spells it,
     the shape empty for a scalar).
Only the safetensors header is read (8-byte little-endian length, then that
many bytes of JSON), so this needs neither torch nor the safetensors package.
router/brick.cc (BaseModelFingerprint) computes the same in C++.

Usage:
  python3 tools/brick_fingerprint.py [MODEL_DIR]      (default models/all-MiniLM-L6-v2)
Or, from Python: fingerprint(model_dir) -> str; sha256_file(path) -> str.
"""
import argparse
import hashlib
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "models", "all-MiniLM-L6-v2")


def safetensors_header(path):
    """The parsed JSON header of a safetensors file (tensor entries and any
    "__metadata__"), read without loading tensor data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        body = f.read(n)
        if len(body) != n:
            raise ValueError(f"{path}: header says {n} bytes, file has {len(body)}")
    header = json.loads(body.decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    return header


def fingerprint_bytes(model_dir):
    """The exact byte string that fingerprint() hashes (useful for debugging
    a mismatch against the C++ side)."""
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        out = bytearray(f.read())
    header = safetensors_header(os.path.join(model_dir, "model.safetensors"))
    names = [k for k in header if k != "__metadata__"]
    # Byte order of the UTF-8 names (equal to code-point order, spelled out so
    # that nobody "fixes" it into a locale-aware sort).
    for name in sorted(names, key=lambda s: s.encode("utf-8")):
        entry = header[name]
        shape = ",".join(str(int(d)) for d in entry["shape"])
        out += f"{name}\t{entry['dtype']}\t{shape}\n".encode("utf-8")
    return bytes(out)


def fingerprint(model_dir):
    """Lowercase hex SHA-256 of fingerprint_bytes(model_dir)."""
    return hashlib.sha256(fingerprint_bytes(model_dir)).hexdigest()


def sha256_file(path):
    """Lowercase hex SHA-256 of a file's bytes, read 1 MiB at a time (the
    checksums that fixtures and result files record)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", nargs="?", default=DEFAULT_MODEL,
                    help="folder with config.json and model.safetensors")
    args = ap.parse_args()
    print(fingerprint(args.model_dir))


if __name__ == "__main__":
    sys.exit(main())
