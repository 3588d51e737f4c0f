#!/usr/bin/env python3
"""Measures what Kiln's sparse FFN (EmbedRequest.ffn_fraction, "emergent
bricks") costs in retrieval quality and buys in time, against a running server.

Method. For each fraction f in --fractions (1 is always run first, as the
dense reference) and each task (py-docstring, man-synopsis, deb-description),
the task's held-out test set (.cache/retrieval/<task>/test.jsonl, first
--max-inputs pairs) is embedded in two settings (--base-only: the first):
  base          routing=ROUTING_NONE, no bricks, no instruction.
  brick+instr   routing=ROUTING_EXPLICIT, bricks=[task], the brick manifest's
                FIRST query / document instruction (deploy/bricks/<task>/<latest>/
                brick.json): docs/QUALITY.md's "brick + instructions" setting.
With --recovery ID, a third setting:
  base+recovery routing=ROUTING_EXPLICIT, bricks=[ID] (a recovery brick made
                by tools/train_sparse_recovery.py), no instruction, for
                f < 1; at f = 1 it is the base setting (routing NONE), so its
                "cos to dense" and delta MRR compare the sparse model plus
                the recovery brick with the dense base model.
Every Embed call sets ffn_fraction=f, except f = 1, where it is left unset so
the server's default (dense) is exercised; every EmbedResponse.ffn_fraction
must echo f (1 when unset), and in brick+instr EmbedResponse.bricks must be
[task] (empty for base). Calls are sequential, up to --batch (<= 32 and
<= Info.max_client_batch) inputs each, all inputs of a call sharing one
instruction, with a --deadline of 600 s by default.
Reported per (fraction, task, setting):
  MRR@10        every test query against all the task's test documents
                (query i's right document is document i; a tie counts against
                it), eval_routing.mrr_at_10, as tools/eval_bricks_torch.py does.
  delta MRR     MRR@10(f) - MRR@10(1), in points (x100).
  cos to dense  mean cosine between each text's embedding at f and at 1 in the
                same setting, over every text embedded (queries + documents);
                the minimum single-text cosine is kept too.
Per fraction: client wall time of the Embed calls (scoring excluded) and the
sum of EmbedResponse.compute_time_us (and queue_time_us). compute_time_us is
the engine time of the batch that carried a request, shared with the other
requests of that batch; with these sequential calls on an otherwise idle server
it is per call, but other clients' traffic would be counted in it. Summary per
fraction over tasks: mean delta MRR per setting, min mean cosine, min
single-text cosine, wall and compute time. Info.ffn_experts gives the groups a
token actually computes: ceil(f x experts).

Reuses tools/eval_routing.py (stubs generated from proto/kiln/v1/kiln.proto
with grpc_tools, manifests, test sets, MRR@10). Uses numpy when importable,
else pure Python. Exits 1 when a response did not echo the fraction, named
the wrong bricks, or a call failed.

Usage: .cache/e2e-venv/bin/python tools/eval_sparse_ffn.py
         [--target 127.0.0.1:50051] [--fractions 1,0.75,0.5,0.25,0.125]
         [--max-inputs N] [--batch 32] [--deadline 600]
         [--bricks deploy/bricks] [--sets .cache/retrieval] [--json OUT]
Start a server with the bricks and the ffn_partition brick first, e.g.
scripts/run.sh (brick dir deploy/bricks, --ffn_partition ffn-e16).
"""
import argparse
import datetime
import json
import math
import os
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
import eval_routing  # noqa: E402
from eval_retrieval import fmt  # noqa: E402
from kiln_client import open_channel, rpc_error, server_info, stops_run  # noqa: E402
from eval_routing import (DEFAULT_BRICKS, DEFAULT_SETS, TASKS,  # noqa: E402
                          generate_stubs, load_manifests, mrr_at_10,
                          quality_md_reference)
from routing_inputs import load_all_rows  # noqa: E402

np = eval_routing.np
SETTINGS = ("base", "brick+instr")
RECOVERY = "base+recovery"
DEFAULT_FRACTIONS = "1,0.75,0.5,0.25,0.125"
MAX_BATCH = 32


def parse_fractions(s):
    out = []
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            f = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {part!r}")
        if not (0.0 < f <= 1.0):  # also rejects NaN
            raise argparse.ArgumentTypeError(f"fraction {part} is outside (0, 1]")
        if f not in out:
            out.append(f)
    if not out:
        raise argparse.ArgumentTypeError("no fractions given")
    return out


def cosines(a, b):
    """Per-row cosine between two equally long lists of vectors."""
    if not a:
        return []
    if np is not None:
        x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        return ((x * y).sum(1) / np.where(den > 0, den, 1.0)).tolist()
    out = []
    for u, v in zip(a, b):
        den = math.sqrt(sum(t * t for t in u)) * math.sqrt(sum(t * t for t in v))
        out.append(sum(p * q for p, q in zip(u, v)) / den if den > 0 else 0.0)
    return out


class SparseEval:
    def __init__(self, args, pb, pb_grpc):
        import grpc
        self.grpc, self.args, self.pb = grpc, args, pb
        self.channel = open_channel(args.target)
        self.stub = pb_grpc.KilnStub(self.channel)
        self.batch = max(1, min(args.batch, MAX_BATCH))
        self.info = None

    def connect(self):
        self.info = server_info(self.stub, self.pb, self.channel, self.args.connect_timeout)
        if self.info.max_client_batch:
            self.batch = max(1, min(self.batch, self.info.max_client_batch))

    def bricks_for(self, setting, task, fraction):
        """The brick ids a request of this cell names (and must get back)."""
        if setting == "base" or (setting == RECOVERY and fraction == 1.0):
            return []
        return [self.args.recovery] if setting == RECOVERY else [task]

    def request(self, texts, instruction, setting, task, fraction):
        pb = self.pb
        kw = {"inputs": texts}
        bricks = self.bricks_for(setting, task, fraction)
        if not bricks:
            kw["routing"] = pb.ROUTING_NONE
        elif setting == RECOVERY:
            kw["routing"] = pb.ROUTING_EXPLICIT
            kw["bricks"] = [pb.BrickRef(id=b) for b in bricks]
        else:
            kw["routing"] = pb.ROUTING_EXPLICIT
            kw["bricks"] = [pb.BrickRef(id=task)]
            kw["instruction"] = instruction
        if fraction != 1.0:
            kw["ffn_fraction"] = fraction  # unset for 1: the server's default
        return pb.EmbedRequest(**kw)

    def embed(self, texts, instruction, setting, task, fraction, st):
        out = []
        want_bricks = self.bricks_for(setting, task, fraction)
        for k in range(0, len(texts), self.batch):
            req = self.request(texts[k:k + self.batch], instruction, setting, task, fraction)
            t0 = time.perf_counter()
            resp = self.stub.Embed(req, timeout=self.args.deadline)
            st["wall_s"] += time.perf_counter() - t0
            st["calls"] += 1
            st["inputs"] += len(req.inputs)
            st["compute_time_us"] += resp.compute_time_us
            st["queue_time_us"] += resp.queue_time_us
            st["tokens"] += sum(e.tokens for e in resp.embeddings)
            st["truncated"] += sum(1 for e in resp.embeddings if e.truncated)
            if abs(resp.ffn_fraction - fraction) > 1e-6:
                st["echo_mismatch_calls"] += 1
                st["echo_seen"][repr(round(resp.ffn_fraction, 6))] = \
                    st["echo_seen"].get(repr(round(resp.ffn_fraction, 6)), 0) + 1
            if [b.id for b in resp.bricks] != want_bricks:
                st["wrong_brick_calls"] += 1
            if len(resp.embeddings) != len(req.inputs):
                raise RuntimeError(f"{len(resp.embeddings)} embeddings for {len(req.inputs)} inputs")
            out += [list(e.values) for e in resp.embeddings]
        return out

    def run_cell(self, task, rows, man, setting, fraction):
        st = {"calls": 0, "inputs": 0, "wall_s": 0.0, "compute_time_us": 0,
              "queue_time_us": 0, "tokens": 0, "truncated": 0,
              "echo_mismatch_calls": 0, "echo_seen": {}, "wrong_brick_calls": 0}
        qi = man["query"][0] if setting == "brick+instr" else ""
        di = man["document"][0] if setting == "brick+instr" else ""
        q = self.embed([r["query"] for r in rows], qi, setting, task, fraction, st)
        d = self.embed([r["document"] for r in rows], di, setting, task, fraction, st)
        st["wall_s"] = round(st["wall_s"], 3)
        return q, d, st


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] + " " + __doc__.split("\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Method and output: see the module docstring (tools/eval_sparse_ffn.py).")
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--fractions", type=parse_fractions, default=parse_fractions(DEFAULT_FRACTIONS),
                    help=f"comma-separated, each in (0, 1] (default {DEFAULT_FRACTIONS}); "
                         "1 is added as the reference when missing")
    ap.add_argument("--max-inputs", type=int, default=0,
                    help="use only the first N test pairs (queries and documents) per task (0 = all)")
    ap.add_argument("--batch", type=int, default=MAX_BATCH,
                    help=f"inputs per Embed call, at most {MAX_BATCH} (and Info.max_client_batch)")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds per Embed call")
    ap.add_argument("--connect-timeout", type=float, default=30.0,
                    help="seconds to wait for the server: its port, then its model warm-up "
                         "(Info answers UNAVAILABLE until it serves)")
    ap.add_argument("--bricks", default=DEFAULT_BRICKS)
    ap.add_argument("--sets", default=DEFAULT_SETS)
    ap.add_argument("--recovery", metavar="ID",
                    help="also run the base+recovery setting with this brick at f < 1")
    ap.add_argument("--base-only", action="store_true",
                    help="run the base setting only (no task bricks): for a server whose model "
                         "the task bricks were not made for, such as a ReLU-fied copy")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    settings = (SETTINGS[:1] if args.base_only else SETTINGS) + ((RECOVERY,) if args.recovery else ())

    fractions = [1.0] + [f for f in args.fractions if f != 1.0]
    added_dense = 1.0 not in args.fractions
    if args.max_inputs < 0:
        sys.exit(f"--max-inputs must be >= 0, got {args.max_inputs}")
    try:
        manifests, _ = load_manifests(args.bricks)
    except (OSError, ValueError) as e:
        if not args.base_only:
            sys.exit(f"cannot read the brick manifests under --bricks {args.bricks}: {e}")
        manifests = {}  # the base setting needs none
    missing = [t for t in TASKS if t not in manifests or not manifests[t]["query"]
               or not manifests[t]["document"]]
    if missing and not args.base_only:
        sys.exit(f"no brick manifest with query and document instructions under {args.bricks} "
                 f"for {missing} (--base-only runs the base setting alone, without task bricks)")
    data = load_all_rows(args.sets, TASKS, args.max_inputs)

    try:
        pb, pb_grpc = generate_stubs()
    except ImportError as e:
        sys.exit(f"needs grpcio and grpcio-tools ({e}); use .cache/e2e-venv/bin/python")
    if "ffn_fraction" not in pb.EmbedRequest.DESCRIPTOR.fields_by_name:
        sys.exit(f"{eval_routing.KILN_PROTO} has no EmbedRequest.ffn_fraction")
    ev = SparseEval(args, pb, pb_grpc)
    try:
        ev.connect()
    except Exception as e:  # noqa: BLE001
        sys.exit(f"cannot reach {args.target}: {e}")
    info = ev.info
    experts = getattr(info, "ffn_experts", 0)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    print(f"# Kiln sparse-FFN evaluation, {date}\n")
    print(f"- target {args.target}; server {info.model_id}, kiln {info.version}, device {info.device}")
    print(f"- Info.ffn_experts {experts}; max_input_tokens {info.max_input_tokens}; "
          f"batch {ev.batch} inputs/call, sequential; deadline {args.deadline:.0f} s")
    groups = {f: (math.ceil(f * experts - 1e-9) if experts else None) for f in fractions}
    print("- fractions " + ", ".join(
        f"{f:g}" + (f" ({groups[f]}/{experts} groups)" if experts else "") for f in fractions)
        + (" (1 added as the dense reference)" if added_dense else ""))
    print(f"- max-inputs {args.max_inputs or 'all'}: "
          + ", ".join(f"{t} {len(data[t])}" for t in TASKS)
          + f"; scoring {'numpy' if np is not None else 'pure Python'}")
    if not experts and len(fractions) > 1:
        print("- note: Info.ffn_experts is 0 (no ffn_partition brick): the server should reject f < 1")

    results = {"date": date, "target": args.target,
               "info": {"model_id": info.model_id, "version": info.version, "device": info.device,
                        "dimensions": info.dimensions, "max_input_tokens": info.max_input_tokens,
                        "max_client_batch": info.max_client_batch, "ffn_experts": experts},
               "fractions": fractions, "dense_added": added_dense,
               "expert_groups": {f"{f:g}": groups[f] for f in fractions},
               "max_inputs": args.max_inputs or None, "batch": ev.batch,
               "deadline_s": args.deadline, "scoring": "numpy" if np is not None else "pure Python",
               "n": {t: len(data[t]) for t in TASKS},
               "settings": list(settings), "base_only": args.base_only,
               "instructions": ({} if args.base_only else
                                {t: {"query": manifests[t]["query"][0],
                                     "document": manifests[t]["document"][0],
                                     "brick_version_on_disk": manifests[t]["version"]}
                                 for t in TASKS}),
               "quality_md_brick_plus_instructions": (None if args.base_only
                                                      else quality_md_reference()),
               "cells": [], "per_fraction": {}}
    dense = {}  # (task, setting) -> (q, d, mrr)
    failed = False
    aborted = None
    print("\nembedding ...", file=sys.stderr, flush=True)
    for f in fractions:
        pf = {"wall_s": 0.0, "compute_time_us": 0, "queue_time_us": 0, "calls": 0,
              "inputs": 0, "tokens": 0, "errors": 0}
        for task in TASKS:
            for setting in settings:
                cell = {"fraction": f, "task": task, "setting": setting, "n": len(data[task])}
                if aborted:
                    cell["error"] = f"skipped: {aborted}"
                    results["cells"].append(cell)
                    pf["errors"] += 1
                    continue
                try:
                    q, d, st = ev.run_cell(task, data[task], manifests.get(task), setting, f)
                except ev.grpc.RpcError as e:
                    cell["error"] = rpc_error(e)
                    if stops_run(e):
                        aborted = cell["error"]
                except RuntimeError as e:
                    cell["error"] = str(e)
                if "error" in cell:
                    failed = True
                    pf["errors"] += 1
                    results["cells"].append(cell)
                    print(f"  f={f:g} {task} {setting}: {cell['error']}", file=sys.stderr, flush=True)
                    continue
                for k in ("wall_s", "compute_time_us", "queue_time_us", "calls", "inputs", "tokens"):
                    pf[k] += st[k]
                failed |= bool(st["echo_mismatch_calls"] or st["wrong_brick_calls"])
                m = mrr_at_10(q, d)
                cell.update({"mrr@10": m["mrr@10"], "recall@1": m["recall@1"], "embed": st})
                if f == 1.0:
                    dense[(task, setting)] = (q, d, m["mrr@10"])
                    cell.update({"delta_mrr_points": 0.0, "mean_cos_to_dense": 1.0,
                                 "min_cos_to_dense": 1.0})
                elif (task, setting) in dense:
                    dq, dd, dm = dense[(task, setting)]
                    cq, cd = cosines(q, dq), cosines(d, dd)
                    allc = cq + cd
                    cell.update({
                        "delta_mrr_points": (round((m["mrr@10"] - dm) * 100, 2)
                                             if m["mrr@10"] is not None and dm is not None else None),
                        "mean_cos_to_dense": round(sum(allc) / len(allc), 6) if allc else None,
                        "mean_cos_to_dense_queries": round(sum(cq) / len(cq), 6) if cq else None,
                        "mean_cos_to_dense_documents": round(sum(cd) / len(cd), 6) if cd else None,
                        "min_cos_to_dense": round(min(allc), 6) if allc else None})
                else:
                    cell.update({"delta_mrr_points": None, "mean_cos_to_dense": None,
                                 "min_cos_to_dense": None, "note": "no dense reference (dense run failed)"})
                results["cells"].append(cell)
                print(f"  f={f:g} {task:<16} {setting:<11} MRR@10 {fmt(m['mrr@10'])} "
                      f"({st['calls']} calls, {st['wall_s']:.1f} s)", file=sys.stderr, flush=True)
        pf["wall_s"] = round(pf["wall_s"], 3)
        results["per_fraction"][f"{f:g}"] = pf

    # --- table ---
    print("\n| fraction | task | setting | MRR@10 | ΔMRR vs dense (points ×100) | mean cos to dense |")
    print("|---|---|---|---|---|---|")
    for c in results["cells"]:
        if "error" in c:
            print(f"| {c['fraction']:g} | {c['task']} | {c['setting']} | error: {c['error']} | - | - |")
            continue
        print(f"| {c['fraction']:g} | {c['task']} | {c['setting']} | {fmt(c['mrr@10'])} | "
              f"{fmt(c['delta_mrr_points'], '+.2f')} | {fmt(c['mean_cos_to_dense'])} |")

    # --- summary per fraction ---
    print("\n| fraction | groups | mean ΔMRR base (pts) | mean ΔMRR brick+instr (pts) | mean ΔMRR all (pts) "
          "| min mean cos | min text cos | wall s | Σ compute_time ms | Σ queue_time ms | calls |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in fractions:
        cells = [c for c in results["cells"] if c["fraction"] == f and "error" not in c]
        pf = results["per_fraction"][f"{f:g}"]

        def mean(xs):
            xs = [x for x in xs if x is not None]
            return round(sum(xs) / len(xs), 2) if xs else None

        def minimum(xs):
            xs = [x for x in xs if x is not None]
            return min(xs) if xs else None
        s = {"mean_delta_mrr_points_base": mean(c["delta_mrr_points"] for c in cells if c["setting"] == "base"),
             "mean_delta_mrr_points_brick_instr": mean(c["delta_mrr_points"] for c in cells
                                                       if c["setting"] == "brick+instr"),
             "mean_delta_mrr_points_base_recovery": mean(c["delta_mrr_points"] for c in cells
                                                         if c["setting"] == RECOVERY),
             "mean_delta_mrr_points": mean(c["delta_mrr_points"] for c in cells),
             "min_mean_cos_to_dense": minimum(c["mean_cos_to_dense"] for c in cells),
             "min_text_cos_to_dense": minimum(c["min_cos_to_dense"] for c in cells),
             "cells_ok": len(cells)}
        pf.update(s)
        g = f"{groups[f]}/{experts}" if experts else "-"
        print(f"| {f:g} | {g} | {fmt(s['mean_delta_mrr_points_base'], '+.2f')} | "
              f"{fmt(s['mean_delta_mrr_points_brick_instr'], '+.2f')} | {fmt(s['mean_delta_mrr_points'], '+.2f')} | "
              f"{fmt(s['min_mean_cos_to_dense'])} | {fmt(s['min_text_cos_to_dense'])} | {pf['wall_s']:.2f} | "
              f"{pf['compute_time_us'] / 1000:.0f} | {pf['queue_time_us'] / 1000:.0f} | {pf['calls']} |")

    if args.recovery:
        print(f"\n| fraction | setting | mean ΔMRR base (pts) | mean ΔMRR base + {args.recovery} (pts) "
              "| mean cos base | mean cos base + recovery |")
        print("|---|---|---|---|---|---|")
        for f in fractions[1:]:
            cells = [c for c in results["cells"] if c["fraction"] == f and "error" not in c]

            def avg(setting, key):
                xs = [c[key] for c in cells if c["setting"] == setting and c.get(key) is not None]
                return sum(xs) / len(xs) if xs else None
            print(f"| {f:g} | vs dense base | {fmt(avg('base', 'delta_mrr_points'), '+.2f')} | "
                  f"{fmt(avg(RECOVERY, 'delta_mrr_points'), '+.2f')} | "
                  f"{fmt(avg('base', 'mean_cos_to_dense'))} | {fmt(avg(RECOVERY, 'mean_cos_to_dense'))} |")

    # --- checks ---
    ref = results["quality_md_brick_plus_instructions"]
    notes = []
    for c in results["cells"]:
        e = c.get("embed", {})
        if e.get("echo_mismatch_calls"):
            notes.append(f"f={c['fraction']:g} {c['task']} {c['setting']}: {e['echo_mismatch_calls']}/"
                         f"{e['calls']} responses did not echo ffn_fraction (seen {e['echo_seen']})")
        if e.get("wrong_brick_calls"):
            notes.append(f"f={c['fraction']:g} {c['task']} {c['setting']}: {e['wrong_brick_calls']}/"
                         f"{e['calls']} responses named other bricks than requested")
        if e.get("truncated") and c["fraction"] == 1.0:
            notes.append(f"{c['task']} {c['setting']}: {e['truncated']} inputs truncated at "
                         f"{info.max_input_tokens} tokens")
        if (c["fraction"] == 1.0 and c["setting"] == "brick+instr" and c.get("mrr@10") is not None
                and c["task"] in ref and not args.max_inputs):
            notes.append(f"{c['task']}: dense brick+instr {c['mrr@10']:.4f} vs QUALITY.md {ref[c['task']]:.3f} "
                         f"({(c['mrr@10'] - ref[c['task']]) * 100:+.2f} points)")
    echo_ok = not any(c.get("embed", {}).get("echo_mismatch_calls") for c in results["cells"])
    print(f"\nffn_fraction echo: {'OK' if echo_ok else 'MISMATCH'}; "
          f"failed cells: {sum(1 for c in results['cells'] if 'error' in c)}")
    print("compute_time_us is per engine batch (shared by the requests in it); "
          "with these sequential calls it is per call.")
    for n in notes:
        print("note:", n)
    results["notes"] = notes
    results["ok"] = not failed
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
            fh.write("\n")
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
