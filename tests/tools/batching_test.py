#!/usr/bin/env python3
"""Unit tests of tools/batching.py, the brick trainers' batch order
(standard library only).

Run from the repo root: python3 tests/tools/batching_test.py
"""
import os
import random
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from batching import batches, group_batches, length_batches  # noqa: E402


def take(it, k):
    return [next(it) for _ in range(k)]


def runs(labels):
    """Lengths of the runs of equal consecutive labels."""
    out, n = [], 1
    for a, b in zip(labels, labels[1:]):
        if a == b:
            n += 1
        else:
            out.append(n)
            n = 1
    return out + [n]


class BatchesTest(unittest.TestCase):
    def test_each_epoch_is_a_permutation_cut_into_whole_batches(self):
        it = batches(10, 4, random.Random(7))
        epoch = take(it, 2)  # 10 // 4 = 2 whole batches; the last 2 rows wait
        self.assertTrue(all(len(b) == 4 for b in epoch))
        flat = [i for b in epoch for i in b]
        self.assertEqual(len(set(flat)), 8)
        self.assertTrue(set(flat) <= set(range(10)))


    def test_fewer_rows_than_one_batch_is_refused(self):
        # It would otherwise loop forever without yielding.
        with self.assertRaisesRegex(ValueError, "3 rows cannot fill one batch of 4"):
            next(batches(3, 4, random.Random(0)))


class GroupBatchesTest(unittest.TestCase):
    # Three modules of 40, 10 and 30 rows.
    GROUPS = ["a"] * 40 + ["b"] * 10 + ["c"] * 30

    def test_batches_are_whole_and_no_row_repeats_within_an_epoch(self):
        it = group_batches(self.GROUPS, 16, 8, random.Random(1))
        epoch = take(it, len(self.GROUPS) // 16)
        self.assertTrue(all(len(b) == 16 for b in epoch))
        flat = [i for b in epoch for i in b]
        self.assertEqual(len(flat), len(set(flat)))
        self.assertTrue(set(flat) <= set(range(len(self.GROUPS))))

    def test_rows_come_in_blocks_of_one_group(self):
        # Groups of whole blocks (40, 16 and 24 rows, blocks of 8): a batch
        # of 16 is exactly two blocks, each all from one group.
        groups = ["a"] * 40 + ["b"] * 16 + ["c"] * 24
        it = group_batches(groups, 16, 8, random.Random(1))
        for b in take(it, 20):
            labels = [groups[i] for i in b]
            self.assertEqual(len(set(labels[:8])), 1, labels)
            self.assertEqual(len(set(labels[8:])), 1, labels)

    def test_random_batches_mix_groups_far_more(self):
        # The control: the same rows in plain shuffled batches come in many
        # short runs, where group batches come in one or two runs per block.
        mean = {}
        for name, it in (("plain", batches(len(self.GROUPS), 16, random.Random(1))),
                         ("group", group_batches(self.GROUPS, 16, 8, random.Random(1)))):
            mean[name] = sum(len(runs([self.GROUPS[i] for i in b])) for b in take(it, 20)) / 20
        self.assertGreater(mean["plain"], 6)
        self.assertLessEqual(mean["group"], 4)

    def test_bad_sizes_are_refused(self):
        with self.assertRaisesRegex(ValueError, "2 rows cannot fill one batch of 16"):
            next(group_batches(["a", "b"], 16, 8, random.Random(0)))
        with self.assertRaisesRegex(ValueError, "block must be >= 1, got 0"):
            next(group_batches(self.GROUPS, 16, 0, random.Random(0)))

    def test_same_seed_same_batches(self):
        a = take(group_batches(self.GROUPS, 16, 8, random.Random(3)), 12)
        b = take(group_batches(self.GROUPS, 16, 8, random.Random(3)), 12)
        c = take(group_batches(self.GROUPS, 16, 8, random.Random(4)), 12)
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)



class LengthBatchesTest(unittest.TestCase):
    # 1000 rows of 1-128 tokens, most short, as the ReLU-fication's texts.
    LENGTHS = [min(128, 1 + int(random.Random(i).expovariate(1 / 50))) for i in range(1000)]

    def padded_share(self, batch_list):
        """Real tokens over padded tokens (each batch padded to its longest)."""
        real = sum(self.LENGTHS[i] for b in batch_list for i in b)
        return real / sum(max(self.LENGTHS[i] for i in b) * len(b) for b in batch_list)

    def test_whole_batches_and_no_row_repeats_within_an_epoch(self):
        # pools of 5 x 32 = 160 rows: 6 full pools (5 batches each) and one of 40 (1).
        epoch = take(length_batches(self.LENGTHS, 32, random.Random(3), pool=5), 31)
        self.assertTrue(all(len(b) == 32 for b in epoch))
        flat = [i for b in epoch for i in b]
        self.assertEqual(len(flat), len(set(flat)))

    def test_batches_hold_similar_lengths(self):
        rng = random.Random(4)
        by_length = take(length_batches(self.LENGTHS, 32, rng, pool=10), 31)
        shuffled = take(batches(len(self.LENGTHS), 32, random.Random(4)), 31)
        self.assertGreater(self.padded_share(by_length), 0.85)
        self.assertLess(self.padded_share(shuffled), 0.6)

    def test_epochs_differ_and_the_same_seed_repeats(self):
        a = take(length_batches(self.LENGTHS, 32, random.Random(5)), 62)
        b = take(length_batches(self.LENGTHS, 32, random.Random(5)), 62)
        self.assertEqual(a, b)
        self.assertNotEqual(sorted(map(sorted, a[:31])), sorted(map(sorted, a[31:])))

    def test_bad_sizes_are_refused(self):
        with self.assertRaisesRegex(ValueError, "3 rows cannot fill one batch of 4"):
            next(length_batches([1, 2, 3], 4, random.Random(0)))
        with self.assertRaisesRegex(ValueError, "pool must be >= 1, got 0"):
            next(length_batches([1, 2, 3], 2, random.Random(0), pool=0))

if __name__ == "__main__":
    unittest.main()
