"""Training batches of row indices for the brick trainers (standard library
only, so tests/tools/batching_test.py runs without PyTorch)."""


def check_enough(n, size):
    """Both generators yield only whole batches: fewer rows than one batch
    would loop forever without yielding."""
    if size < 1 or n < size:
        raise ValueError(f"{n} rows cannot fill one batch of {size}")


def batches(n, size, rng):
    """Endless index batches: seeded shuffles, one epoch after another."""
    check_enough(n, size)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for s in range(0, n - size + 1, size):
            yield order[s:s + size]


def group_batches(groups, size, block, rng):
    """Endless index batches of hard negatives: each epoch shuffles the rows
    of every group (a row's module, say), cuts each group into blocks of at
    most `block` rows, shuffles the blocks and fills batches of `size` from
    them in that order, so a batch holds a few groups' rows side by side
    instead of a random sample. groups[i] is row i's group."""
    check_enough(len(groups), size)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    by_group = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    while True:
        blocks = []
        for g in sorted(by_group):
            rows = list(by_group[g])
            rng.shuffle(rows)
            blocks += [rows[s:s + block] for s in range(0, len(rows), block)]
        rng.shuffle(blocks)
        order = [i for b in blocks for i in b]
        for s in range(0, len(order) - size + 1, size):
            yield order[s:s + size]


def length_batches(lengths, size, rng, pool=50):
    """Endless index batches of rows of similar length (lengths[i]: row i's
    tokens), so that a padded batch is mostly real tokens: each epoch
    shuffles the rows, cuts them into pools of pool x size rows, sorts each
    pool by length, cuts it into whole batches and shuffles all the batches
    of the epoch. A pool's last rows that do not fill a batch wait for the
    next epoch's shuffle. A row is in at most one batch per epoch."""
    check_enough(len(lengths), size)
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    while True:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        out = []
        for p in range(0, len(order), pool * size):
            rows = sorted(order[p:p + pool * size], key=lambda i: lengths[i])
            out += [rows[s:s + size] for s in range(0, len(rows) - size + 1, size)]
        rng.shuffle(out)
        yield from out
