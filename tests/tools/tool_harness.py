"""A fixture for the tests of the offline tools' argument checks
(partition_tools_test.py, training_tools_test.py). Standard library only.

The tools need PyTorch to run but check their arguments before importing
it. Fixture.run runs a tool as a user would, with packages named torch,
transformers, safetensors, peft and numpy on PYTHONPATH that fail on
import, so a test can tell a refusal made before any of them loaded from
one made after.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from brick_fingerprint import fingerprint  # noqa: E402
from calibration_args import TASKS  # noqa: E402

BLOCKED = "imported before the arguments were checked"
BLOCKED_PACKAGES = ("torch", "transformers", "safetensors", "peft", "numpy")


class Fixture:
    """A model folder (config.json and a model.safetensors with an empty
    header: no tensors), retrieval sets with two pairs per
    task and split, a partition version folder, a fake kiln binary and the
    import blockers, in tmp."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.model = os.path.join(tmp, "model")
        os.makedirs(self.model)
        self.write_config()
        with open(os.path.join(self.model, "model.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", 2) + b"{}")
        self.sets = os.path.join(tmp, "sets")
        for task in TASKS:
            os.makedirs(os.path.join(self.sets, task))
            for split in ("train", "test"):
                with open(os.path.join(self.sets, task, f"{split}.jsonl"), "w") as f:
                    for i in range(2):
                        f.write(json.dumps({"query": f"q{i}", "document": f"d{i}"}) + "\n")
        self.partition = self.brick("ffn_partition")
        self.kiln = os.path.join(tmp, "kiln")
        with open(self.kiln, "w") as f:
            f.write("#!/bin/sh\nexit 3\n")
        os.chmod(self.kiln, 0o755)
        self.blockers = os.path.join(tmp, "blockers")
        for name in BLOCKED_PACKAGES:
            os.makedirs(os.path.join(self.blockers, name))
            with open(os.path.join(self.blockers, name, "__init__.py"), "w") as f:
                f.write(f"raise ImportError('{name} {BLOCKED}')\n")

    def write_config(self, **changes):
        """Writes the model's config.json: MiniLM's sizes with `changes`
        (a value of None removes the key)."""
        config = {"max_position_embeddings": 512, "intermediate_size": 1536,
                  "num_hidden_layers": 6, "hidden_act": "gelu"}
        config.update(changes)
        with open(os.path.join(self.model, "config.json"), "w") as f:
            json.dump({k: v for k, v in config.items() if v is not None}, f)

    def brick(self, kind, name="part/ffn-e16/3"):
        """A version folder with an empty ffn_partition.safetensors and a
        brick.json of this kind, made for the model as it is now."""
        folder = os.path.join(self.tmp, name)
        os.makedirs(folder)
        open(os.path.join(folder, "ffn_partition.safetensors"), "wb").close()
        with open(os.path.join(folder, "brick.json"), "w") as f:
            json.dump({"id": "ffn-e16", "version": 3, "kind": kind,
                       "base_model": {"name": "model", "fingerprint": fingerprint(self.model)}},
                      f)
        return folder

    def lora(self, name, r=8, alpha=16):
        """A LoRA brick folder: adapter_config.json with r and lora_alpha
        and an empty adapter_model.safetensors."""
        folder = os.path.join(self.tmp, name)
        os.makedirs(folder)
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump({"r": r, "lora_alpha": alpha, "peft_type": "LORA"}, f)
        open(os.path.join(folder, "adapter_model.safetensors"), "wb").close()
        return folder

    def run(self, tool, *args):
        env = dict(os.environ, PYTHONPATH=self.blockers)
        return subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *args],
                              capture_output=True, text=True, env=env, timeout=60)


class ToolTestCase(unittest.TestCase):
    """A test case with a Fixture in a fresh tmp (self.fx, self.tmp). A
    subclass's setUp sets self.written: the path a refused run must not
    have created."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name
        self.fx = Fixture(self.tmp)

    def tearDown(self):
        self._tmp.cleanup()

    def assertRefused(self, result, *names):
        """Exit 1 before any blocked import, no traceback, every name in
        the message, nothing written."""
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertNotIn(BLOCKED, result.stderr)
        for name in names:
            self.assertIn(name, result.stderr)
        self.assertFalse(os.path.exists(self.written), "something was written")

    def assertPassedChecks(self, result):
        """The run got past its checks: it stopped at a blocked import."""
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(BLOCKED, result.stderr)
