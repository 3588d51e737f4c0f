#!/usr/bin/env python3
"""Unit tests of the routing evaluation's instruction files and its count of
false routes (tools/routing_inputs.py, tools/eval_routing.py; standard
library only: no grpc, no numpy, no server).

The committed instruction files are checked against the committed brick
manifests: a manifest example equal to a test instruction would make the
routing evaluation test on the router's own keys.

Run from the repo root: python3 tests/tools/eval_routing_test.py
"""
import json
import os
import subprocess
import sys
import tempfile
import types
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import eval_routing as evr  # noqa: E402
import routing_inputs as ri  # noqa: E402

BRICKS = os.path.join(ROOT, "deploy", "bricks")


def instruction_file(**overrides):
    """A valid instruction file's contents (30 made-up paraphrases per task
    and side), with top-level keys replaced by overrides."""
    data = {"_about": "test file"}
    for task in ri.TASKS:
        data[task] = {side: [f"{task} {side} paraphrase number {i}:" for i in range(30)]
                      for side in ri.SIDES}
    data.update(overrides)
    return data


class SelfCheckTest(unittest.TestCase):
    def check(self, data):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "instructions.json")
            with open(path, "w") as f:
                json.dump(data, f)
            return ri.self_check(path, BRICKS)

    def test_committed_files_pass_against_the_committed_manifests(self):
        for name in ("routing_instructions.json", "routing_instructions_heldout.json",
                     "routing_instructions_third.json"):
            path = os.path.join(ROOT, "tools", name)
            self.assertEqual(ri.self_check(path, BRICKS), [], name)
            data = ri.load_instructions(path)
            self.assertGreaterEqual(len(data.get("unrelated", [])), 7, name)

    def test_a_valid_file_passes(self):
        self.assertEqual(self.check(instruction_file(unrelated=["Represent the tweet:"])), [])

    def test_unrelated_equal_to_a_manifest_example_is_refused(self):
        _, every = ri.load_manifests(BRICKS)
        example = every[0][3]
        problems = self.check(instruction_file(unrelated=[example.upper() + " "]))
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("unrelated", problems[0])
        self.assertIn("equals manifest example", problems[0])

    def test_unrelated_duplicating_a_task_instruction_is_refused(self):
        problems = self.check(instruction_file(unrelated=["py-docstring query paraphrase number 3"]))
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("duplicates py-docstring.query", problems[0])

    def test_unrelated_must_be_a_list_of_strings(self):
        self.assertEqual(self.check(instruction_file(unrelated="query:")), ["unrelated: not a list"])
        problems = self.check(instruction_file(unrelated=["", 3]))
        self.assertEqual(len(problems), 2, problems)

    def test_an_unknown_key_is_refused(self):
        self.assertEqual(self.check(instruction_file(unrelatd=[])), ["unexpected keys: ['unrelatd']"])

    def test_a_short_side_is_refused(self):
        data = instruction_file()
        data["man-synopsis"]["document"] = data["man-synopsis"]["document"][:29]
        self.assertEqual(self.check(data), ["man-synopsis.document: 29 instructions (< 30)"])

    def test_misshapen_files_are_problems_not_crashes(self):
        problems = self.check([instruction_file()])
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("the top level is not an object", problems[0])
        self.assertEqual(self.check(instruction_file(**{"man-synopsis": ["a", "b"]})),
                         ["man-synopsis: not an object of query and document lists"])

    def test_a_missing_brick_folder_is_a_problem_naming_the_flag(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "instructions.json")
            with open(path, "w") as f:
                json.dump(instruction_file(), f)
            nowhere = os.path.join(tmp, "no-bricks")
            problems = ri.self_check(path, nowhere)
        self.assertEqual(len(problems), 1, problems)
        self.assertIn(f"--bricks {nowhere}: cannot read the brick manifests", problems[0])


class PoolTest(unittest.TestCase):
    def test_files_pool_in_order_and_an_instruction_counts_once(self):
        a = instruction_file(unrelated=["Represent the tweet:", "query:"])
        b = instruction_file(unrelated=["QUERY", "Represent the recipe:"])
        b["man-synopsis"]["query"] = ["man-synopsis query paraphrase number 2",  # a's, as normed
                                      "Which command is this?"]
        pooled = ri.pool_instructions([a, b])
        self.assertEqual(pooled["man-synopsis"]["query"],
                         a["man-synopsis"]["query"] + ["Which command is this?"])
        self.assertEqual(pooled["py-docstring"]["document"], a["py-docstring"]["document"])
        self.assertEqual(pooled["unrelated"],
                         ["Represent the tweet:", "query:", "Represent the recipe:"])

    def test_the_same_text_on_another_side_is_kept(self):
        a = instruction_file()
        b = instruction_file()
        b["deb-description"]["document"] = ["py-docstring query paraphrase number 0:"]
        pooled = ri.pool_instructions([a, b])
        self.assertEqual(pooled["deb-description"]["document"][-1],
                         "py-docstring query paraphrase number 0:")
        self.assertEqual(len(pooled["deb-description"]["document"]), 31)

    def test_the_default_is_the_blind_files(self):
        self.assertEqual([os.path.basename(p) for p in ri.DEFAULT_INSTRUCTIONS],
                         ["routing_instructions_heldout.json", "routing_instructions_third.json"])


class ManifestsTest(unittest.TestCase):
    def test_a_brick_without_instructions_has_empty_lists(self):
        manifests, _ = ri.load_manifests(BRICKS)
        self.assertEqual(manifests["ffn-e16"]["query"], [])  # a partition brick
        self.assertEqual(manifests["ffn-e16"]["document"], [])
        self.assertTrue(manifests["py-docstring"]["query"])

    def test_a_manifest_that_is_not_json_is_named(self):
        with tempfile.TemporaryDirectory() as tmp:
            os.makedirs(os.path.join(tmp, "b", "1"))
            path = os.path.join(tmp, "b", "1", "brick.json")
            with open(path, "w") as f:
                f.write("{kind:")
            with self.assertRaisesRegex(ValueError, "brick.json: not JSON"):
                ri.load_manifests(tmp)


class LoadRowsTest(unittest.TestCase):
    def write(self, tmp, text):
        os.makedirs(os.path.join(tmp, "man-synopsis"))
        path = os.path.join(tmp, "man-synopsis", "test.jsonl")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_rows_in_order_blank_lines_skipped_and_capped(self):
        with tempfile.TemporaryDirectory() as tmp:
            self.write(tmp, "".join(json.dumps({"query": f"q{i}", "document": f"d{i}"}) + "\n\n"
                                    for i in range(3)))
            self.assertEqual([r["query"] for r in ri.load_rows(tmp, "man-synopsis", 0)],
                             ["q0", "q1", "q2"])
            self.assertEqual([r["query"] for r in ri.load_rows(tmp, "man-synopsis", 2)],
                             ["q0", "q1"])
            with self.assertRaisesRegex(ri.UsageError, "--max-inputs must be >= 0"):
                ri.load_rows(tmp, "man-synopsis", -1)

    def test_unusable_sets_are_named(self):
        cases = [("", "no pairs"),
                 ('{"query": "q"}\n', "test.jsonl:1: needs string keys query and document"),
                 ('{"query": "q", "document": "d"}\nnot json\n', "test.jsonl:2: not JSON")]
        for text, fragment in cases:
            with self.subTest(fragment=fragment), tempfile.TemporaryDirectory() as tmp:
                path = self.write(tmp, text)
                with self.assertRaises(ri.UsageError) as cm:
                    ri.load_rows(tmp, "man-synopsis", 0)
                self.assertIn(path if fragment == "no pairs" else fragment, str(cm.exception))
                with self.assertRaises(SystemExit) as cm:
                    ri.load_all_rows(tmp, ["man-synopsis"], 0)
                self.assertIn(f"--sets {tmp}: ", str(cm.exception))
                self.assertIn("tools/build_retrieval_set.py", str(cm.exception))
        with tempfile.TemporaryDirectory() as tmp, self.assertRaises(SystemExit) as cm:
            ri.load_all_rows(tmp, ["py-docstring"], 0)
        self.assertIn(os.path.join(tmp, "py-docstring", "test.jsonl"), str(cm.exception))


def route_response(plan, scores):
    """A RouteResponse stand-in: bricks in the plan, candidates best first."""
    return types.SimpleNamespace(
        bricks=[types.SimpleNamespace(id=b) for b in plan],
        candidates=[types.SimpleNamespace(id=i, score=s) for i, s in scores])


class UnrelatedRoutesTest(unittest.TestCase):
    def test_counts_every_instruction_given_a_brick(self):
        answers = {
            "Represent the tweet:": route_response([], [("py-docstring", 0.31), ("man-synopsis", 0.2)]),
            "Represent the SQL query:": route_response(["py-docstring"], [("py-docstring", 0.43)]),
            "query:": route_response([], [("deb-description", 0.389)]),
            "passage:": route_response([], []),
        }
        ev = object.__new__(evr.Evaluator)
        ev.route = answers.__getitem__
        got = ev.unrelated_routes(list(answers))
        self.assertEqual(got["n"], 4)
        self.assertEqual(got["routed_to_brick"], 1)
        self.assertEqual(got["false_routes"], [{"instruction": "Represent the SQL query:",
                                                "chosen": ["py-docstring"], "top_score": 0.43}])
        self.assertEqual(got["max_top_score"], 0.43)

    def test_a_failed_route_is_recorded_and_the_rest_still_run(self):
        codes = types.SimpleNamespace(**{c: types.SimpleNamespace(name=c) for c in (
            "INVALID_ARGUMENT", "UNIMPLEMENTED", "UNAVAILABLE")})

        class FakeRpcError(Exception):
            def code(self):
                return self.args[0]

            def details(self):
                return "instruction: too long"

        def route(s):
            if s == "bad":
                raise FakeRpcError(codes.INVALID_ARGUMENT)
            if s == "gone":
                raise FakeRpcError(codes.UNAVAILABLE)
            return route_response(["py-docstring"] if s == "SQL:" else [], [("py-docstring", 0.43)])

        ev = object.__new__(evr.Evaluator)
        ev.route = route
        ev.grpc = types.SimpleNamespace(RpcError=FakeRpcError, StatusCode=codes)
        got = ev.unrelated_routes(["tweet:", "bad", "SQL:"])
        self.assertEqual(got["n"], 3)
        self.assertEqual(got["routed_to_brick"], 1)
        self.assertEqual(got["errors"], [{"instruction": "bad",
                                          "error": "INVALID_ARGUMENT: instruction: too long"}])
        # A server that is gone stops the run rather than fill it with errors.
        with self.assertRaises(FakeRpcError):
            ev.unrelated_routes(["tweet:", "gone", "SQL:"])


class RetrievalStopsTest(unittest.TestCase):
    def test_a_server_that_is_gone_skips_the_settings_left(self):
        codes = types.SimpleNamespace(**{c: types.SimpleNamespace(name=c) for c in (
            "INVALID_ARGUMENT", "UNAVAILABLE")})

        class FakeRpcError(Exception):
            def code(self):
                return self.args[0]

            def details(self):
                return "connection refused"

        calls = []

        def score_setting(task, rows, qi, di, mode):
            calls.append((task, mode))
            if len(calls) == 2:
                raise FakeRpcError(codes.INVALID_ARGUMENT)  # recorded, the run goes on
            if len(calls) == 3:
                raise FakeRpcError(codes.UNAVAILABLE)  # the run stops here
            return {"mrr@10": 0.5, "recall@1": 0.25, "embed": {"calls": 1}, "embed_seconds": 0.1}

        ev = object.__new__(evr.Evaluator)
        ev.args = types.SimpleNamespace()
        ev.grpc = types.SimpleNamespace(RpcError=FakeRpcError, StatusCode=codes)
        ev.score_setting = score_setting
        tasks = ["py-docstring", "man-synopsis"]
        manifests = {t: {"version": 1, "query": ["q:"], "document": ["d:"]} for t in tasks}
        instructions = {t: {"query": ["a:"], "document": ["b:"]} for t in tasks}
        data = {t: [{"query": "q", "document": "d"}] for t in tasks}
        out = evr.Evaluator.retrieval(ev, tasks, instructions, manifests, {}, data)
        self.assertEqual(len(calls), 3)
        s = out["py-docstring"]["settings"]
        self.assertEqual(s["explicit-manifest"]["mrr@10"], 0.5)
        self.assertEqual(s["auto"], {"error": "INVALID_ARGUMENT: connection refused"})
        self.assertEqual(s["explicit-same-text"], {"error": "UNAVAILABLE: connection refused"})
        for name, res in out["man-synopsis"]["settings"].items():
            self.assertEqual(res, {"error": "skipped: UNAVAILABLE: connection refused"}, name)
        self.assertIsNone(out["py-docstring"]["auto_minus_explicit_same_text_points"])


class RefusalsBeforeConnectingTest(unittest.TestCase):
    """eval_routing.py and eval_sparse_ffn.py run as users run them: what
    they refuse before they generate stubs or connect, each exit naming the
    flag or file. grpc_tools is blocked (a package of that name on
    PYTHONPATH that fails on import), so no server is needed."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name
        blocker = os.path.join(self.tmp, "blockers", "grpc_tools")
        os.makedirs(blocker)
        with open(os.path.join(blocker, "__init__.py"), "w") as f:
            f.write("raise ImportError('grpc_tools blocked by the test')\n")
        self.sets = os.path.join(self.tmp, "sets")
        for task in ri.TASKS:
            os.makedirs(os.path.join(self.sets, task))
            with open(os.path.join(self.sets, task, "test.jsonl"), "w") as f:
                f.write(json.dumps({"query": "q", "document": "d"}) + "\n")

    def tearDown(self):
        self._tmp.cleanup()

    def run_tool(self, tool, *args):
        env = dict(os.environ, PYTHONPATH=os.path.join(self.tmp, "blockers"))
        p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool),
                            "--target", "127.0.0.1:1", "--sets", self.sets, *args],
                           capture_output=True, text=True, env=env, timeout=120)
        self.assertNotIn("Traceback", p.stderr)
        return p

    def bricks_with_empty_query(self, task):
        """A copy of deploy/bricks' manifests whose `task` brick has no query
        instructions."""
        root = os.path.join(self.tmp, "bricks")
        manifests, _ = ri.load_manifests(BRICKS)
        for t in ri.TASKS:
            folder = os.path.join(root, t, str(manifests[t]["version"]))
            os.makedirs(folder)
            with open(os.path.join(BRICKS, t, str(manifests[t]["version"]), "brick.json")) as f:
                m = json.load(f)
            if t == task:
                m["instructions"]["query"] = []
            with open(os.path.join(folder, "brick.json"), "w") as f:
                json.dump(m, f)
        return root

    def assertRefused(self, tool, args, *fragments):
        p = self.run_tool(tool, *args)
        self.assertEqual(p.returncode, 1, (args, p.stderr))
        for fragment in fragments:
            self.assertIn(fragment, p.stderr, args)

    def test_eval_routing(self):
        bad = os.path.join(self.tmp, "instructions.json")
        with open(bad, "w") as f:
            json.dump(instruction_file(unrelatd=[]), f)
        bricks = self.bricks_with_empty_query("man-synopsis")
        for args, fragments in [
                (["--instructions", bad], [f"{bad} fails --self-check", "unexpected keys"]),
                (["--instructions", os.path.join(ROOT, "tools", "routing_instructions_third.json"),
                  bad], [f"{bad} fails --self-check"]),
                (["--max-inputs", "-1"], ["--max-inputs must be >= 0, got -1"]),
                (["--bricks", bricks], [f"no brick manifest with query and document "
                                        f"instructions under {bricks} for ['man-synopsis']"]),
                ([], ["needs grpcio and grpcio-tools", "grpc_tools blocked by the test"])]:
            with self.subTest(args=args):
                self.assertRefused("eval_routing.py", args, *fragments)

    def test_eval_sparse_ffn(self):
        bricks = self.bricks_with_empty_query("deb-description")
        for args, fragments in [
                (["--max-inputs", "-2"], ["--max-inputs must be >= 0, got -2"]),
                (["--bricks", bricks], ["for ['deb-description']", "--base-only"]),
                (["--base-only"], ["needs grpcio and grpcio-tools"])]:
            with self.subTest(args=args):
                self.assertRefused("eval_sparse_ffn.py", args, *fragments)

if __name__ == "__main__":
    unittest.main()
