#!/usr/bin/env python3
"""Where a forward's GPU time goes, from the Nsight Compute CSV that
bench/gpu.sh writes (ncu --metrics gpu__time_duration.sum --csv --page raw
around kiln_bench_device):

  bench/ncu_breakdown.py OUT/gpu/ncu.csv

kiln_bench_device runs, per shape, a warm-up forward, the timed forward(s),
then the shape's Linear layers alone (the GEMM roofline), once to warm up and
once per repeat; the number of roofline passes is the run's GEMM count over
the forward's. A forward is the kernels from EmbeddingSumKernel to
PoolKernel; this prints, for the last forward of each shape, the time of each
kernel family and its share, next to the roofline's GEMMs (one pass).
Kernel times here are summed one kernel at a time under the profiler, so
they leave out the gaps between launches that the wall-clock figures in
bench.jsonl include.
"""

from __future__ import annotations

import csv
import sys
from collections import OrderedDict

FAMILIES = [  # (family, substring of the kernel name), first match wins
    ("LinearEpilogue (bias, LoRA, GELU)", "LinearEpilogueKernel"),
    ("Attention", "AttentionKernel"),
    ("LayerNorm (+ residual)", "LayerNormKernel"),
    ("EmbeddingSum", "EmbeddingSumKernel"),
    ("Pool", "PoolKernel"),
    ("LoRA shrink", "LoraShrink"),
    ("GEMM (cuBLAS)", "gemm"),
]


def family(name: str) -> str:
    for fam, key in FAMILIES:
        if key in name:
            return fam
    return "other: " + name.split("(")[0][:60]


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1], newline="") as f:
        rows = list(csv.reader(line for line in f if line.startswith('"')))
    if len(rows) < 3:
        print(f"{sys.argv[1]}: no kernel rows", file=sys.stderr)
        return 1
    head, units, rows = rows[0], rows[1], rows[2:]
    k, t = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[units[t]]
    kernels = [(r[k], float(r[t].replace(",", "")) * scale) for r in rows]

    # Split into forwards (EmbeddingSum .. Pool) and the GEMM runs after them.
    forwards, gemms_after, current = [], [], None
    for name, us in kernels:
        if "EmbeddingSumKernel" in name:
            current = []
        if current is not None:
            current.append((name, us))
            if "PoolKernel" in name:
                forwards.append(current)
                gemms_after.append([])
                current = None
        elif gemms_after:
            gemms_after[-1].append((name, us))

    # A shape ends where a forward is followed by its roofline GEMMs.
    shape = 0
    for i, fwd in enumerate(forwards):
        if not gemms_after[i]:
            continue
        shape += 1
        # The roofline run repeats the forward's GEMMs (one warm-up, then one
        # per --repeats), so its passes are counted from the forward's own.
        per_pass = sum(1 for name, _ in fwd if family(name) == "GEMM (cuBLAS)")
        passes = max(1, len(gemms_after[i]) // max(1, per_pass))
        gemm_us = sum(us for _, us in gemms_after[i]) / passes
        sums: dict[str, float] = OrderedDict()
        for name, us in fwd:
            sums[family(name)] = sums.get(family(name), 0.0) + us
        total = sum(sums.values())
        print(f"shape {shape} (the forward before the roofline run): {len(fwd)} kernels, "
              f"{total:.0f} us; roofline GEMMs {gemm_us:.0f} us "
              f"(kernel-time roofline fraction {gemm_us / total:.3f})")
        for fam, us in sorted(sums.items(), key=lambda kv: -kv[1]):
            print(f"  {fam:<36} {us:9.0f} us  {100 * us / total:5.1f}%")
    if shape == 0:
        print("no forward followed by its roofline GEMMs found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
