#!/usr/bin/env python3
"""Unit tests of tools/eval_retrieval.py's metric, flag and file functions
(standard library only: no grpc, no numpy needed).

Run from the repo root: python3 tests/tools/eval_retrieval_test.py
"""
import contextlib
import gzip
import io
import json
import os
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import eval_retrieval as er  # noqa: E402


# Four queries against four documents; document i is query i's right one.
#   q0 -> d0 scores 0.9, best of its row:                rank 1
#   q1 -> d1 scores 0.5, d0 and d3 score more:            rank 3
#   q2 -> d2 scores 0.7, d3 ties it at 0.7, d0 is below:  rank 2 (the tie counts against it)
#   q3 -> d3 scores 0.1, all three others score more:     rank 4
SCORES = [
    [0.9, 0.1, 0.2, 0.3],
    [0.6, 0.5, 0.4, 0.8],
    [0.1, 0.2, 0.7, 0.7],
    [0.5, 0.4, 0.3, 0.1],
]
RANKS = [1, 3, 2, 4]


class RanksTest(unittest.TestCase):
    def test_ranks_from_scores_count_ties_against_the_right_document(self):
        self.assertEqual(er.ranks_from_scores(SCORES), RANKS)

    def test_all_equal_scores_rank_last(self):
        self.assertEqual(er.ranks_from_scores([[0.5] * 3] * 3), [3, 3, 3])

    def test_ranks_of_right_from_vectors_pure_python(self):
        # Exactly representable vectors: d1 equals d0, so q0 and q1 tie on
        # both; q2's right document d2 scores 1, d0/d1 score 0.
        q = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
        d = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
        self.assertEqual(er.ranks_of_right(q, d, use_numpy=False), [2, 2, 1])

    @unittest.skipIf(er.np is None, "numpy not installed")
    def test_ranks_of_right_numpy_agrees_with_pure_python(self):
        q = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
        d = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]
        self.assertEqual(er.ranks_of_right(q, d, use_numpy=True),
                         er.ranks_of_right(q, d, use_numpy=False))

    def test_ranks_of_right_rejects_unequal_sides(self):
        with self.assertRaises(ValueError):
            er.ranks_of_right([[1.0]], [[1.0], [0.0]], use_numpy=False)

    def test_empty(self):
        self.assertEqual(er.ranks_of_right([], [], use_numpy=False), [])
        self.assertEqual(er.retrieval_metrics([]),
                         {"n": 0, "mrr@10": None, "recall@1": None, "recall@10": None})


class MetricsTest(unittest.TestCase):
    def test_hand_computed_ranking(self):
        m = er.retrieval_metrics(RANKS)
        self.assertEqual(m["n"], 4)
        self.assertAlmostEqual(m["mrr@10"], (1 + 1 / 3 + 1 / 2 + 1 / 4) / 4)  # 0.5208
        self.assertAlmostEqual(m["recall@1"], 0.25)
        self.assertAlmostEqual(m["recall@10"], 1.0)

    def test_rank_11_scores_zero_and_misses_recall_at_10(self):
        m = er.retrieval_metrics([1, 10, 11])
        self.assertAlmostEqual(m["mrr@10"], (1 + 0.1 + 0) / 3)
        self.assertAlmostEqual(m["recall@1"], 1 / 3)
        self.assertAlmostEqual(m["recall@10"], 2 / 3)

    def test_rank_11_from_a_score_matrix(self):
        # 12 documents; query 0's right document has 10 documents above it.
        row = [0.5] + [0.9] * 10 + [0.1]
        scores = [row] + [[1.0 if j == i else 0.0 for j in range(12)] for i in range(1, 12)]
        ranks = er.ranks_from_scores(scores)
        self.assertEqual(ranks[0], 11)
        self.assertEqual(ranks[1:], [1] * 11)
        m = er.retrieval_metrics(ranks)
        self.assertAlmostEqual(m["mrr@10"], 11 / 12)
        self.assertAlmostEqual(m["recall@10"], 11 / 12)

    def test_perfect(self):
        self.assertEqual(er.retrieval_metrics([1] * 5),
                         {"n": 5, "mrr@10": 1.0, "recall@1": 1.0, "recall@10": 1.0})

    def test_worst(self):
        self.assertEqual(er.retrieval_metrics([20] * 20),
                         {"n": 20, "mrr@10": 0.0, "recall@1": 0.0, "recall@10": 0.0})

    def test_tokens_per_second(self):
        self.assertEqual(er.tokens_per_second(1000, 0.5), 2000)
        self.assertIsNone(er.tokens_per_second(1000, 0.0))


class FlagsTest(unittest.TestCase):
    def test_parse_brick(self):
        self.assertEqual(er.parse_brick("py-docstring"),
                         {"id": "py-docstring", "version": 0, "weight": None})
        self.assertEqual(er.parse_brick("py-docstring@2"),
                         {"id": "py-docstring", "version": 2, "weight": None})
        self.assertEqual(er.parse_brick("a.b_c@3:-0.5"), {"id": "a.b_c", "version": 3, "weight": -0.5})
        self.assertEqual(er.parse_brick("x:1.5"), {"id": "x", "version": 0, "weight": 1.5})
        self.assertEqual(er.format_brick(er.parse_brick("a@3:-0.5")), "a@3:-0.5")

    def test_parse_brick_rejects(self):
        for bad in ("", "Upper", "a@x", "a:w", "a:nan", "a@1@2", "@1"):
            with self.subTest(bad=bad), self.assertRaises(er.UsageError):
                er.parse_brick(bad)

    def test_parse_exits(self):
        self.assertEqual(er.parse_exits(None, 6), [1, 2, 3, 4, 5, 6])
        self.assertEqual(er.parse_exits("6,1,3,3", 6), [1, 3, 6])
        for bad in ("0", "7", "a", ","):
            with self.subTest(bad=bad), self.assertRaises(er.UsageError):
                er.parse_exits(bad, 6)
        for spec in (None, "1"):  # a server that reports no layers
            with self.subTest(spec=spec), self.assertRaisesRegex(er.UsageError, "Info.num_layers"):
                er.parse_exits(spec, 0)

    def test_a_missing_set_is_named_as_given(self):
        # A relative --set is the caller's; the repository is tried only when
        # it holds the file, so the error names the caller's path.
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)
            try:
                with contextlib.redirect_stderr(io.StringIO()) as err:
                    rc = er.main(["--set", "a=nope.jsonl"])
            finally:
                os.chdir(cwd)
        self.assertEqual(rc, 2)
        self.assertIn(f"set file not found: {os.path.join(tmp, 'nope.jsonl')}", err.getvalue())

    def test_parse_set(self):
        self.assertEqual(er.parse_set("t2c=/a/b=c.jsonl"), ("t2c", "/a/b=c.jsonl"))
        with self.assertRaises(er.UsageError):
            er.parse_set("/a/b.jsonl")


class LoadPairsTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.rows = [{"id": str(i), "group": "g", "query": f"q{i}", "document": f"d{i}"}
                     for i in range(5)]

    def tearDown(self):
        self.dir.cleanup()

    def write(self, name, lines, gz=False):
        path = os.path.join(self.dir.name, name)
        with (gzip.open if gz else open)(path, "wt", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        return path

    def test_reads_gzip_and_plain_and_cuts(self):
        lines = [json.dumps(r) for r in self.rows]
        gz = self.write("s.jsonl.gz", lines, gz=True)
        plain = self.write("s.jsonl", lines)
        self.assertEqual(er.load_pairs(gz), self.rows)
        self.assertEqual(er.load_pairs(plain, max_inputs=2), self.rows[:2])

    def test_missing_file_names_it(self):
        with self.assertRaisesRegex(er.UsageError, "set file not found: .*nope.jsonl.gz"):
            er.load_pairs(os.path.join(self.dir.name, "nope.jsonl.gz"))

    def test_bad_line_names_file_and_line(self):
        path = self.write("bad.jsonl", [json.dumps(self.rows[0]), '{"query": "only"}'])
        with self.assertRaisesRegex(er.UsageError, r"bad.jsonl:2: needs string keys"):
            er.load_pairs(path)


if __name__ == "__main__":
    unittest.main()
