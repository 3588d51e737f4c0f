#!/usr/bin/env python3
"""Evaluates Kiln's instruction-aware router against a running server: how
often Route picks the right brick for instructions it has never seen, and what
ROUTING_AUTO costs in retrieval quality against naming the brick explicitly.

Instructions: an instruction file holds, per task (brick id) and side
(query / document), >= 30 hand-written paraphrases a client developer might
send, and optionally "unrelated" ones. None is in any brick manifest (the
manifests' examples are the router's keys, so testing on them would be
testing on the training data); --self-check verifies that, case- and
whitespace-insensitively. Three files: tools/routing_instructions.json (its
misroutes were read when the manifests' routing examples were written on
2026-11-30, so it is no longer held out), and two written blind by writers
who saw neither the manifests nor any other file:
tools/routing_instructions_heldout.json (2026-11-30) and
tools/routing_instructions_third.json (2026-12-02). The default pools the
two blind ones (--instructions takes several files; an instruction an
earlier file holds is counted once): the honest measure, and a larger
sample than either. The instruction files, the brick manifests, the test
sets and QUALITY.md's reference column are read by tools/routing_inputs.py.

(a) Routing accuracy. Every paraphrase is sent to Route. It is correct when
    the plan (RouteResponse.bricks) is exactly [the task's brick] (top-1; a
    plan of two bricks, or the base model, is a miss). Also reported: how
    often the best-scoring candidate is the task's brick (candidates[0]),
    which differs from the plan only when --router_top_k > 1 or a score is
    below --router_min_score. Prints n / correct / accuracy per task and
    side, overall (target >= 90%), and every misroute with its candidates.

    Instructions under the file's optional "unrelated" key are for tasks
    no brick serves: each is sent to Route too, and the right plan is the
    base model; every one routed to a brick is listed (false routes).

(b) End-to-end retrieval, MRR@10 and recall@1 per task over
    .cache/retrieval/<task>/test.jsonl, every test query against all of the
    task's test documents (query i's right document is document i), as
    tools/eval_bricks_torch.py does: the server embeds "<instruction> <text>",
    L2-normalised; score = dot product; the rank of the right document counts
    every document scoring >= it (a tie counts against it); 1/rank if <= 10.
    Three settings:
      explicit-manifest   ROUTING_EXPLICIT, bricks=[task], the manifest's
                          FIRST query / document instruction: docs/QUALITY.md's
                          "brick + instructions" column (printed alongside;
                          note the server truncates at Info.max_input_tokens
                          while eval_bricks_torch.py cut at 128 tokens, so long
                          documents can differ slightly).
      auto                ROUTING_AUTO, no bricks; query i is sent with the
                          task's query paraphrase i % n, document i with
                          document paraphrase i % n (deterministic round
                          robin); the server picks the plan per call.
      explicit-same-text  the same paraphrases as auto, with bricks=[task]
                          named explicitly: the fair baseline. AUTO minus this
                          is reported in points (x100; target: within 1).
    Inputs are grouped by their instruction (all inputs of one call share
    it) and sent up to --batch (<= Info.max_client_batch) per Embed call.
    For auto, every call whose EmbedResponse.bricks is not exactly [task] is
    counted as a wrong-brick call (with its inputs and the plans seen).

API assumption: EmbedRequest gets a `routing` field (enum Routing). If the
proto in use has none, auto is sent as ROUTING_UNSPECIFIED with no bricks,
which means the server's --default_routing, so the run then requires
Info.default_routing == ROUTING_AUTO; explicit settings just list the brick.

Stubs are generated from proto/kiln/v1/kiln.proto at run time with
grpc_tools (tools/kiln_client.py, as tests/e2e/kiln_e2e.py does). Uses numpy when importable, else
pure Python (about 10 s per task and setting at the full test sets).

Usage: .cache/e2e-venv/bin/python tools/eval_routing.py
         [--target 127.0.0.1:50051] [--task all|TASK ...] [--max-inputs N]
         [--batch 32] [--deadline 600] [--skip-routing] [--skip-retrieval]
         [--instructions FILE ...]  (default: the two blind files, pooled)
         [--bricks deploy/bricks] [--sets .cache/retrieval] [--json OUT]
         [--strict]
       .cache/e2e-venv/bin/python tools/eval_routing.py --self-check
Start a server with the bricks first, e.g. scripts/run.sh (brick dir
deploy/bricks). --strict exits 1 when a target is missed.
"""
import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# generate_stubs and KILN_PROTO are re-exported for eval_sparse_ffn.py.
from kiln_client import (KILN_PROTO, ROOT, generate_stubs, open_channel, rpc_error,  # noqa: E402,F401
                         server_info, stops_run)
# The inputs; eval_sparse_ffn.py imports several of them from here.
# The ranking metrics and numpy (None in the e2e venv) are eval_retrieval's;
# the printed report is routing_report's.
from eval_retrieval import mrr_at, np, ranks_of_right, recall_at  # noqa: E402
from routing_report import (AUTO_GAP_TARGET_POINTS, ROUTING_TARGET, print_retrieval,  # noqa: E402
                            print_routing)
from routing_inputs import (DEFAULT_BRICKS, DEFAULT_INSTRUCTIONS, DEFAULT_SETS,  # noqa: E402
                            SIDES, TASKS, load_all_rows, load_instructions, load_manifests,
                            pool_instructions, quality_md_reference, self_check)


# --- API ----------------------------------------------------------------------

def api_features(pb):
    req = pb.EmbedRequest.DESCRIPTOR.fields_by_name
    return {"embed_request_routing": "routing" in req,
            "route_rpc": "Route" in pb.DESCRIPTOR.services_by_name["Kiln"].methods_by_name,
            "routing_enum": "Routing" in pb.DESCRIPTOR.enum_types_by_name}


# --- scoring ------------------------------------------------------------------

def mrr_at_10(q, d):
    """{"mrr@10", "recall@1", "n"}, rounded to 4 places; q[i]'s right
    document is d[i] (eval_retrieval's ranking: ties count against it)."""
    ranks = ranks_of_right(q, d)
    if not ranks:
        return {"mrr@10": None, "recall@1": None, "n": 0}
    return {"mrr@10": round(mrr_at(ranks, 10), 4), "recall@1": round(recall_at(ranks, 1), 4),
            "n": len(ranks)}


# --- the evaluation -----------------------------------------------------------

class Evaluator:
    def __init__(self, args, pb, pb_grpc):
        import grpc
        self.grpc = grpc
        self.args, self.pb = args, pb
        self.api = api_features(pb)
        self.channel = open_channel(args.target)
        self.stub = pb_grpc.KilnStub(self.channel)
        self.info = None
        self.batch = args.batch

    def rpc_error(self, e):
        return rpc_error(e)

    def stops_run(self, e):
        return stops_run(e)

    def connect(self):
        self.info = server_info(self.stub, self.pb, self.channel, self.args.connect_timeout)
        if self.info.max_client_batch:
            self.batch = max(1, min(self.batch, self.info.max_client_batch))

    def route(self, instruction):
        return self.stub.Route(self.pb.RouteRequest(instruction=instruction),
                               timeout=self.args.deadline)

    # (a)
    def routing_accuracy(self, tasks, instructions):
        per, misroutes, errors = {}, [], []
        total = correct_total = top1_total = 0
        for task in tasks:
            for side in SIDES:
                n = correct = top1 = 0
                for s in instructions[task][side]:
                    try:
                        r = self.route(s)
                    except self.grpc.RpcError as e:
                        errors.append({"task": task, "side": side, "instruction": s,
                                       "error": self.rpc_error(e)})
                        if self.stops_run(e):
                            raise
                        n += 1
                        continue
                    n += 1
                    plan = [b.id for b in r.bricks]
                    ok = plan == [task]
                    best = r.candidates[0].id if r.candidates else None
                    correct += ok
                    top1 += best == task
                    if not ok:
                        misroutes.append({
                            "task": task, "side": side, "instruction": s,
                            "chosen": [{"id": b.id, "version": b.version,
                                        "weight": round(b.weight, 4) if b.HasField("weight") else None}
                                       for b in r.bricks],
                            "candidates": [{"id": c.id, "score": round(c.score, 4), "side": c.side,
                                            "chosen": c.chosen, "reason": c.reason}
                                           for c in r.candidates],
                            "reason": r.reason})
                per[f"{task}/{side}"] = {"n": n, "correct": correct,
                                         "accuracy": round(correct / n, 4) if n else None,
                                         "top1_candidate_correct": top1}
                total += n
                correct_total += correct
                top1_total += top1
        return {"per_task_side": per, "n": total, "correct": correct_total,
                "accuracy": round(correct_total / total, 4) if total else None,
                "top1_candidate_correct": top1_total,
                "target": ROUTING_TARGET, "misroutes": misroutes, "errors": errors}

    def unrelated_routes(self, instructions):
        """Routes every "unrelated" instruction; the right plan is the base
        model. {"n", "routed_to_brick", "false_routes": [...], "max_top_score",
        "errors": [...]}. A failed Route is recorded, as routing_accuracy does,
        and the rest still run; a server that is gone or too old stops it."""
        false_routes, top_scores, errors = [], [], []
        for s in instructions:
            try:
                r = self.route(s)
            except self.grpc.RpcError as e:
                errors.append({"instruction": s, "error": self.rpc_error(e)})
                if self.stops_run(e):
                    raise
                continue
            if r.candidates:
                top_scores.append(r.candidates[0].score)
            if r.bricks:  # a chosen brick is always a candidate
                false_routes.append({"instruction": s, "chosen": [b.id for b in r.bricks],
                                     "top_score": round(r.candidates[0].score, 4)})
        return {"n": len(instructions), "routed_to_brick": len(false_routes),
                "false_routes": false_routes,
                "max_top_score": round(max(top_scores), 4) if top_scores else None,
                "errors": errors}

    def embed_request(self, texts, instruction, mode, task):
        pb = self.pb
        kw = {"inputs": texts, "instruction": instruction}
        if mode == "auto":
            if self.api["embed_request_routing"]:
                kw["routing"] = pb.ROUTING_AUTO
        else:
            kw["bricks"] = [pb.BrickRef(id=task)]
            if self.api["embed_request_routing"]:
                kw["routing"] = pb.ROUTING_EXPLICIT
        return pb.EmbedRequest(**kw)

    def embed_all(self, texts, instr_of, mode, task, stats):
        """Vectors of texts, input i sent with instruction instr_of[i]."""
        groups = {}
        for i, s in enumerate(instr_of):
            groups.setdefault(s, []).append(i)
        out = [None] * len(texts)
        for instruction, idx in groups.items():
            for k in range(0, len(idx), self.batch):
                part = idx[k:k + self.batch]
                req = self.embed_request([texts[i] for i in part], instruction, mode, task)
                resp = self.stub.Embed(req, timeout=self.args.deadline)
                plan = [b.id for b in resp.bricks]
                key = ",".join(plan) or "(base)"
                stats["calls"] += 1
                stats["inputs"] += len(part)
                stats["plans"][key] = stats["plans"].get(key, 0) + 1
                stats["truncated"] += sum(1 for e in resp.embeddings if e.truncated)
                if plan != [task]:
                    stats["wrong_brick_calls"] += 1
                    stats["wrong_brick_inputs"] += len(part)
                    if len(stats["wrong_examples"]) < 20:
                        stats["wrong_examples"].append({"instruction": instruction, "plan": key})
                if self.api["embed_request_routing"] or hasattr(resp, "routing"):
                    want = self.pb.ROUTING_AUTO if mode == "auto" else self.pb.ROUTING_EXPLICIT
                    if resp.routing != want:
                        stats["routing_field_mismatch"] += 1
                for i, e in zip(part, resp.embeddings):
                    out[i] = list(e.values)
        return out

    def score_setting(self, task, rows, q_instr, d_instr, mode):
        stats = {"calls": 0, "inputs": 0, "plans": {}, "truncated": 0,
                 "wrong_brick_calls": 0, "wrong_brick_inputs": 0, "wrong_examples": [],
                 "routing_field_mismatch": 0}
        t0 = time.time()
        q = self.embed_all([r["query"] for r in rows], q_instr, mode, task, stats)
        d = self.embed_all([r["document"] for r in rows], d_instr, mode, task, stats)
        t1 = time.time()
        res = mrr_at_10(q, d)
        res.update({"embed_seconds": round(t1 - t0, 1),
                    "score_seconds": round(time.time() - t1, 1), "embed": stats})
        return res

    def retrieval(self, tasks, instructions, manifests, ref, data):
        """MRR@10 per task and setting over data[task] (load_all_rows). A
        call the server refuses is recorded in its setting; when the server
        is gone or too old (stops_run) the settings left are recorded as
        skipped."""
        out = {}
        aborted = None
        for task in tasks:
            rows = data[task]
            n = len(rows)
            man = manifests[task]
            qp, dp = instructions[task]["query"], instructions[task]["document"]
            para_q = [qp[i % len(qp)] for i in range(n)]
            para_d = [dp[i % len(dp)] for i in range(n)]
            entry = {"n": n, "brick_version_on_disk": man["version"],
                     "manifest_query_instruction": man["query"][0],
                     "manifest_document_instruction": man["document"][0],
                     "quality_md_brick_plus_instructions": ref.get(task), "settings": {}}
            plan = [("explicit-manifest", [man["query"][0]] * n, [man["document"][0]] * n, "explicit"),
                    ("auto", para_q, para_d, "auto"),
                    ("explicit-same-text", para_q, para_d, "explicit")]
            for name, qi, di, mode in plan:
                if aborted:
                    res = {"error": f"skipped: {aborted}"}
                else:
                    try:
                        res = self.score_setting(task, rows, qi, di, mode)
                    except self.grpc.RpcError as e:
                        res = {"error": self.rpc_error(e)}
                        if self.stops_run(e):
                            aborted = res["error"]
                entry["settings"][name] = res
                show = (f"MRR@10 {res['mrr@10']:.4f}  R@1 {res['recall@1']:.4f}  "
                        f"({res['embed']['calls']} calls, {res['embed_seconds']} s)"
                        if "error" not in res else f"error {res['error']}")
                print(f"  {task:<16} {name:<19} {show}", file=sys.stderr, flush=True)
            a = entry["settings"]["auto"].get("mrr@10")
            e = entry["settings"]["explicit-same-text"].get("mrr@10")
            entry["auto_minus_explicit_same_text_points"] = (
                round((a - e) * 100, 2) if a is not None and e is not None else None)
            m = entry["settings"]["explicit-manifest"].get("mrr@10")
            entry["explicit_manifest_minus_quality_md_points"] = (
                round((m - ref[task]) * 100, 2) if m is not None and task in ref else None)
            out[task] = entry
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--task", nargs="+", default=["all"], choices=["all", *TASKS])
    ap.add_argument("--instructions", nargs="+", default=list(DEFAULT_INSTRUCTIONS),
                    metavar="FILE",
                    help="instruction file(s); several are pooled, an instruction that "
                         "an earlier file holds counted once")
    ap.add_argument("--bricks", default=DEFAULT_BRICKS)
    ap.add_argument("--sets", default=DEFAULT_SETS)
    ap.add_argument("--max-inputs", type=int, default=0,
                    help="use only the first N test pairs of each task (0 = all)")
    ap.add_argument("--batch", type=int, default=32, help="inputs per Embed call")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds per RPC")
    ap.add_argument("--connect-timeout", type=float, default=30.0,
                    help="seconds to wait for the server: its port, then its model warm-up "
                         "(Info answers UNAVAILABLE until it serves)")
    ap.add_argument("--skip-routing", action="store_true")
    ap.add_argument("--skip-retrieval", action="store_true")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--self-check", action="store_true",
                    help="validate the instruction file (and the stubs) and exit 0/1")
    args = ap.parse_args()
    tasks = list(TASKS) if "all" in args.task else args.task

    if args.self_check:
        problems = []
        for path in args.instructions:
            problems += [f"{path}: {p}" for p in self_check(path, args.bricks)]
            try:
                data = load_instructions(path)
            except (OSError, ValueError):
                data = {}  # self_check has said why
            for task in TASKS:
                if isinstance(data, dict) and isinstance(data.get(task), dict):
                    print(f"{os.path.basename(path)}: {task:<16} " + "  ".join(
                        f"{side} {len(data[task].get(side) or [])}" for side in SIDES))
        try:
            _, every = load_manifests(args.bricks)
            print(f"checked against {len(every)} manifest examples under {args.bricks}")
        except (OSError, ValueError):
            pass  # self_check has said why
        try:
            pb, _ = generate_stubs()
            print(f"stubs: generated from {os.path.relpath(KILN_PROTO, ROOT)}; api {api_features(pb)}")
        except Exception as e:  # noqa: BLE001 -- report, do not fail the file check
            print(f"stubs: not generated ({e.__class__.__name__}: {e})")
        ref = quality_md_reference()
        print(f"QUALITY.md brick+instructions MRR@10: {ref or 'not found'}")
        print(f"scoring: {'numpy ' + np.__version__ if np is not None else 'pure Python'}; "
              f"mrr_at_10 sanity {mrr_at_10([[1, 0], [0, 1]], [[1, 0], [1, 0]])}")
        for p in problems:
            print("PROBLEM:", p)
        print("self-check:", "FAILED" if problems else "OK")
        return 1 if problems else 0

    for path in args.instructions:
        problems = self_check(path, args.bricks)
        if problems:
            for p in problems:
                print("PROBLEM:", p, file=sys.stderr)
            sys.exit(f"{path} fails --self-check; fix it first")
    if args.max_inputs < 0:
        sys.exit(f"--max-inputs must be >= 0, got {args.max_inputs}")
    instructions = pool_instructions([load_instructions(p) for p in args.instructions])
    manifests, _ = load_manifests(args.bricks)  # self_check has read them
    missing = [t for t in tasks if t not in manifests or not manifests[t]["query"]
               or not manifests[t]["document"]]
    if missing:
        sys.exit(f"no brick manifest with query and document instructions under {args.bricks} "
                 f"for {missing}")
    data = {} if args.skip_retrieval else load_all_rows(args.sets, tasks, args.max_inputs)

    try:
        pb, pb_grpc = generate_stubs()
    except ImportError as e:
        sys.exit(f"needs grpcio and grpcio-tools ({e}); use .cache/e2e-venv/bin/python")
    ev = Evaluator(args, pb, pb_grpc)
    try:
        ev.connect()
    except Exception as e:  # noqa: BLE001
        sys.exit(f"cannot reach {args.target}: {e}")
    info = ev.info
    api = ev.api
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "target": args.target, "tasks": tasks, "max_inputs": args.max_inputs or None,
               "instructions": [os.path.relpath(p, ROOT) for p in args.instructions],
               "batch": ev.batch,
               "info": {"model_id": info.model_id, "version": info.version,
                        "device": info.device, "dimensions": info.dimensions,
                        "max_input_tokens": info.max_input_tokens,
                        "max_client_batch": info.max_client_batch,
                        "default_routing": pb.Routing.Name(info.default_routing)},
               "api": api, "router": None, "scoring": "numpy" if np is not None else "pure Python"}
    notes = []
    if not api["embed_request_routing"]:
        notes.append("EmbedRequest has no `routing` field in this proto: auto is sent as "
                     "ROUTING_UNSPECIFIED without bricks (= --default_routing)")
        if info.default_routing != pb.ROUTING_AUTO and not args.skip_retrieval:
            notes.append("Info.default_routing is not AUTO, so the auto setting would not route")
    try:
        first = instructions[tasks[0]]["query"][0]
        r = ev.route(first)
        results["router"] = {"router_exit": r.router_exit, "top_k": r.top_k,
                             "min_score": round(r.min_score, 4),
                             "temperature": round(r.temperature, 4),
                             "routable": [f"{c.id}@{c.version}" for c in r.candidates]}
        for c in r.candidates:
            if c.id in manifests and c.version != manifests[c.id]["version"]:
                notes.append(f"server routes to {c.id}@{c.version}, disk latest is "
                             f"@{manifests[c.id]['version']}")
    except ev.grpc.RpcError as e:
        results["router"] = {"error": ev.rpc_error(e)}
    results["notes"] = notes

    print(f"Kiln routing evaluation, {results['date']}, target {args.target}")
    print(f"server: {info.model_id}, kiln {info.version}, device {info.device}, "
          f"max_input_tokens {info.max_input_tokens}, default_routing "
          f"{results['info']['default_routing']}")
    rt = results["router"]
    print("router: " + (f"exit {rt['router_exit']}, top_k {rt['top_k']}, min_score "
                        f"{rt['min_score']}, temperature {rt['temperature']}, routable "
                        f"{', '.join(rt['routable'])}" if "error" not in rt else f"Route failed: {rt['error']}"))
    print(f"settings: tasks {', '.join(tasks)}; max_inputs {args.max_inputs or 'all'}; "
          f"batch {ev.batch}; deadline {args.deadline:.0f} s; scoring {results['scoring']}")
    for n in notes:
        print("note:", n)

    missed = False
    if not args.skip_routing:
        if "error" in rt:
            results["routing"] = {"error": rt["error"]}
            print(f"\n(a) skipped: Route failed: {rt['error']}")
            missed = True
        else:
            try:
                results["routing"] = ev.routing_accuracy(tasks, instructions)
                if instructions.get("unrelated"):
                    results["routing"]["unrelated"] = ev.unrelated_routes(instructions["unrelated"])
                print_routing(results["routing"])
                acc = results["routing"]["accuracy"]
                missed |= acc is None or acc < ROUTING_TARGET
            except ev.grpc.RpcError as e:
                results["routing"] = {"error": ev.rpc_error(e)}
                print(f"\n(a) aborted: {ev.rpc_error(e)}")
                missed = True
    if not args.skip_retrieval:
        print("\nembedding ...", file=sys.stderr)
        results["retrieval"] = ev.retrieval(tasks, instructions, manifests, quality_md_reference(), data)
        gaps = print_retrieval(results["retrieval"])
        missed |= not gaps or min(gaps) < -AUTO_GAP_TARGET_POINTS
        results["retrieval_summary"] = {
            "worst_auto_minus_explicit_same_text_points": min(gaps) if gaps else None,
            "target_points": AUTO_GAP_TARGET_POINTS}
    results["targets_met"] = not missed
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        print(f"\nwrote {args.json}")
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
