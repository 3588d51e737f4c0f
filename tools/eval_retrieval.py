#!/usr/bin/env python3
"""Retrieval quality and tokens/s of a running `kiln serve` at every exit.

Drives the server through its gRPC API (not the library): what a client gets.

For each set (default: text2code and code2code, gzipped JSONL under
data/code-retrieval/) and each exit 1..Info.num_layers (or --exits), reports
MRR@10, recall@1 and recall@10, and the tokens/s the server delivered at that
exit in the same run.

Sets. JSONL, gzipped (.gz) or plain, one object per line with the keys
query and document (id and group are kept out of scoring). --max-inputs N
keeps each set's first N pairs. The JSON output records each file's sha256
(of the whole file, also when cut).

Retrieval, as tools/eval_routing.py scores it: every query against all the
documents of its set; query i's right document is document i. The server
L2-normalises (EmbedRequest.normalize is left unset = true), so
score = dot product. The rank of the right document counts every document
scoring >= it, itself included, so a tie counts against it. MRR@10 = mean of
1/rank where rank <= 10, else 0; recall@k = share of queries with rank <= k.

Requests. Every Embed call carries the same settings: routing =
ROUTING_EXPLICIT with the --brick list (none = the base model, whatever the
server's --default_routing), ffn_fraction when --ffn_fraction is given (unset
= dense), exit_layer = the exit, and --instruction-query on query calls /
--instruction-document on document calls (default none). Each response must
echo the bricks (the versions used are recorded) and the fraction. Inputs go
in sequential calls of up to --batch (default and cap Info.max_client_batch),
each with a --deadline. One untimed warm-up call at the deepest exit loads the
bricks first, so a brick load is not billed to exit 1; a brick the server
refuses (NOT_FOUND, FAILED_PRECONDITION, ...) stops the run there with the
server's status message.

tokens/s at an exit = sum of Embedding.tokens (what the model saw: [CLS],
[SEP] and the instruction included) over every query and document of every
set at that exit, divided by the summed client wall time of those Embed
calls. That time includes request serialisation, the loopback gRPC round
trip, the server's queueing, tokenisation, compute and pooling, and decoding
the response into Python messages; it excludes reading the sets and scoring.
Calls are sequential from one client, so this is single-client throughput,
not the server's peak under concurrent load. "engine tok/s" divides the same
tokens by the sum of EmbedResponse.compute_time_us instead (the engine time
of the batches that carried the calls; on an otherwise idle server, one call
per batch).

Uses numpy when importable, else pure Python (about 5 us per query-document
pair of 384 floats: ~20 s per set and exit at 2,000 pairs). Imports grpc
only when it runs, so the metric functions can be tested without it
(tests/tools/eval_retrieval_test.py).

Usage: .cache/e2e-venv/bin/python tools/eval_retrieval.py
         [--target 127.0.0.1:50051] [--set NAME=PATH ...] [--exits 1,3,6]
         [--brick ID[@VERSION][:WEIGHT] ...] [--ffn_fraction F]
         [--instruction-query S] [--instruction-document S]
         [--max-inputs N] [--batch N] [--deadline 120] [--json OUT]
Start a server first (e.g. scripts/run.sh; bricks need --brick_dir).
Exits 2 on an unreachable server, a missing or malformed set, or a refused
request.
"""
import argparse
import datetime
import gzip
import json
import math
import os
import platform
import re
import sys
import time
from operator import mul

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
from brick_fingerprint import sha256_file  # noqa: E402
from kiln_client import ROOT, generate_stubs, open_channel, rpc_error, server_info  # noqa: E402

DEFAULT_SETS = (
    ("text2code", os.path.join("data", "code-retrieval", "text2code.test.jsonl.gz")),
    ("code2code", os.path.join("data", "code-retrieval", "code2code.test.jsonl.gz")),
)
BRICK_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

try:
    import numpy as np
except ImportError:  # the e2e venv has no numpy
    np = None


class UsageError(Exception):
    """A bad flag or input file; main() prints it and exits 2."""


# --- metrics (pure) -------------------------------------------------------------

def ranks_from_scores(scores):
    """Rank of each query's right document from a square score matrix
    (scores[i][j] = query i against document j; document i is query i's right
    one): 1 + the number of OTHER documents scoring >= it, i.e. ties count
    against the right document."""
    return [sum(1 for s in row if s >= row[i]) for i, row in enumerate(scores)]


def ranks_of_right(q, d, use_numpy=None):
    """ranks_from_scores of the dot products of q[i] and d[j] (lists of equal
    length vectors). use_numpy None = numpy when importable."""
    if len(q) != len(d):
        raise ValueError(f"{len(q)} queries but {len(d)} documents")
    if not q:
        return []
    if use_numpy is None:
        use_numpy = np is not None
    if use_numpy:
        qa = np.asarray(q, dtype=np.float64)
        da = np.asarray(d, dtype=np.float64)
        sims = qa @ da.T
        # The diagonal comes out of the same product, so a document equal to
        # the right one scores exactly the same and counts as a tie.
        return (sims >= np.diag(sims)[:, None]).sum(axis=1).astype(int).tolist()
    ranks = []
    for i, qv in enumerate(q):
        sims = [sum(map(mul, qv, dv)) for dv in d]
        right = sims[i]
        ranks.append(sum(1 for s in sims if s >= right))
    return ranks


def mrr_at(ranks, k=10):
    """Mean of 1/rank over queries whose rank <= k (others add 0); None if empty."""
    if not ranks:
        return None
    return sum(1.0 / r for r in ranks if r <= k) / len(ranks)


def recall_at(ranks, k):
    """Share of queries whose right document ranks <= k; None if empty."""
    if not ranks:
        return None
    return sum(1 for r in ranks if r <= k) / len(ranks)


def retrieval_metrics(ranks):
    """{"n", "mrr@10", "recall@1", "recall@10"} of a list of ranks (1-based)."""
    return {"n": len(ranks), "mrr@10": mrr_at(ranks, 10),
            "recall@1": recall_at(ranks, 1), "recall@10": recall_at(ranks, 10)}


def tokens_per_second(tokens, seconds):
    """tokens / seconds, None when no time was measured."""
    return tokens / seconds if seconds > 0 else None


# --- flags and files (pure) ---------------------------------------------------

def parse_brick(spec):
    """"id[@version][:weight]" -> {"id", "version" (0 = latest), "weight"
    (None = unset, the server's 1)}. Raises UsageError."""
    m = re.fullmatch(r"([^@:]+)(?:@(\d+))?(?::(.+))?", spec.strip())
    if not m or not BRICK_ID.fullmatch(m.group(1)):
        raise UsageError(f"--brick {spec!r}: expected ID[@VERSION][:WEIGHT], "
                         f"ID matching {BRICK_ID.pattern}")
    weight = None
    if m.group(3) is not None:
        try:
            weight = float(m.group(3))
        except ValueError:
            raise UsageError(f"--brick {spec!r}: weight {m.group(3)!r} is not a number") from None
        if not math.isfinite(weight):
            raise UsageError(f"--brick {spec!r}: weight must be finite")
    return {"id": m.group(1), "version": int(m.group(2) or 0), "weight": weight}


def format_brick(b):
    return (b["id"] + (f"@{b['version']}" if b["version"] else "")
            + (f":{b['weight']:g}" if b["weight"] is not None else ""))


def parse_exits(spec, num_layers):
    """"1,3,6" -> [1, 3, 6] (sorted, unique), each in 1..num_layers; empty or
    None -> every exit 1..num_layers. Raises UsageError."""
    if num_layers < 1:
        raise UsageError(f"the server reports {num_layers} layers (Info.num_layers)")
    if not spec:
        return list(range(1, num_layers + 1))
    try:
        exits = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--exits {spec!r}: expected a comma-separated list of integers") from None
    bad = [e for e in exits if not 1 <= e <= num_layers]
    if bad or not exits:
        raise UsageError(f"--exits {spec!r}: exits must be in 1..{num_layers} (Info.num_layers)")
    return exits


def parse_set(spec):
    """"NAME=PATH" -> (NAME, PATH). Raises UsageError."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise UsageError(f"--set {spec!r}: expected NAME=PATH")
    return name, path


def load_pairs(path, max_inputs=0):
    """[{"query", "document", ...}] of a JSONL set, gzipped when the name ends
    in .gz; the first max_inputs pairs when > 0. Raises UsageError naming the
    file (and line) when it is missing or malformed."""
    if not os.path.isfile(path):
        raise UsageError(f"set file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise UsageError(f"{path}:{lineno}: not JSON: {e}") from None
                if not isinstance(row, dict) or not all(
                        isinstance(row.get(k), str) for k in ("query", "document")):
                    raise UsageError(f"{path}:{lineno}: needs string keys query and document")
                rows.append(row)
                if max_inputs and len(rows) >= max_inputs:
                    break
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read: {e}") from None
    if not rows:
        raise UsageError(f"{path}: no pairs")
    return rows


def host_cpu():
    """"<model name> (<n> logical CPUs)" from /proc/cpuinfo where there is one."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


# --- the server ---------------------------------------------------------------

class Client:
    """Sends one run's Embed calls (same bricks, fraction, batch, deadline)."""

    def __init__(self, args, bricks):
        import grpc
        self.grpc = grpc
        self.pb, pb_grpc = generate_stubs()
        self.args, self.bricks = args, bricks
        self.channel = open_channel(args.target)
        self.stub = pb_grpc.KilnStub(self.channel)
        self.info = None
        self.batch = args.batch
        self.served_bricks = None

    def connect(self):
        try:
            self.info = server_info(self.stub, self.pb, self.channel, self.args.connect_timeout)
        except TimeoutError as e:
            raise UsageError(f"cannot reach a server at {self.args.target}: {e}") from None
        except self.grpc.RpcError as e:
            raise UsageError(f"Info on {self.args.target} failed: {rpc_error(e)}") from None
        cap = self.info.max_client_batch or 64
        self.batch = min(self.batch or cap, cap)

    def request(self, texts, instruction, exit_layer):
        pb = self.pb
        kw = {"inputs": texts, "instruction": instruction, "exit_layer": exit_layer,
              "routing": pb.ROUTING_EXPLICIT,
              "bricks": [pb.BrickRef(id=b["id"], version=b["version"],
                                     **({"weight": b["weight"]} if b["weight"] is not None else {}))
                         for b in self.bricks]}
        if self.args.ffn_fraction is not None:
            kw["ffn_fraction"] = self.args.ffn_fraction
        return pb.EmbedRequest(**kw)

    def check(self, resp, exit_layer):
        """Raises UsageError when the response did not run what was asked."""
        got = [(b.id, b.version) for b in resp.bricks]
        want = [b["id"] for b in self.bricks]
        if [g[0] for g in got] != want or any(
                b["version"] and b["version"] != g[1] for b, g in zip(self.bricks, got)):
            raise UsageError(f"the server ran bricks {got}, asked for "
                             f"{[format_brick(b) for b in self.bricks]}")
        if resp.exit_layer != exit_layer:
            raise UsageError(f"the server ran exit {resp.exit_layer}, asked for {exit_layer}")
        want_f = 1.0 if self.args.ffn_fraction is None else self.args.ffn_fraction
        if abs(resp.ffn_fraction - want_f) > 1e-6:
            raise UsageError(f"the server ran ffn_fraction {resp.ffn_fraction:g}, asked for {want_f:g}")
        if self.served_bricks is None:
            self.served_bricks = [{"id": b.id, "version": b.version,
                                   "weight": b.weight if b.HasField("weight") else 1.0}
                                  for b in resp.bricks]

    def embed(self, texts, instruction, exit_layer, stats):
        """Vectors of texts at exit_layer; adds tokens, calls, seconds (client
        wall time of the calls only), compute_us and truncated to stats."""
        out = []
        for k in range(0, len(texts), self.batch):
            req = self.request(texts[k:k + self.batch], instruction, exit_layer)
            t0 = time.perf_counter()
            try:
                resp = self.stub.Embed(req, timeout=self.args.deadline)
            except self.grpc.RpcError as e:
                f = self.args.ffn_fraction
                raise UsageError(f"Embed failed (exit {exit_layer}, bricks "
                                 f"{', '.join(map(format_brick, self.bricks)) or 'none'}, "
                                 f"ffn_fraction {'unset' if f is None else format(f, 'g')}): "
                                 f"{rpc_error(e)}") from None
            stats["seconds"] += time.perf_counter() - t0
            self.check(resp, exit_layer)
            stats["calls"] += 1
            stats["compute_us"] += resp.compute_time_us
            for e in resp.embeddings:
                stats["tokens"] += e.tokens
                stats["truncated"] += e.truncated
                out.append(list(e.values))
        return out

    def warm_up(self, sets, exit_layer):
        """One untimed call (loads the bricks; the first error stops the run)."""
        first = next(iter(sets.values()))[0]
        stats = {"seconds": 0.0, "calls": 0, "compute_us": 0, "tokens": 0, "truncated": 0}
        self.embed([first["query"]], self.args.instruction_query, exit_layer, stats)


def evaluate(client, sets, exits):
    """[{exit, sets: {name: metrics + timing}, tokens, seconds, tokens/s}]."""
    results = []
    for ex in exits:
        entry = {"exit": ex, "sets": {}}
        total = {"seconds": 0.0, "calls": 0, "compute_us": 0, "tokens": 0, "truncated": 0}
        for name, rows in sets.items():
            stats = {"seconds": 0.0, "calls": 0, "compute_us": 0, "tokens": 0, "truncated": 0}
            q = client.embed([r["query"] for r in rows], client.args.instruction_query, ex, stats)
            d = client.embed([r["document"] for r in rows], client.args.instruction_document, ex, stats)
            t0 = time.perf_counter()
            m = retrieval_metrics(ranks_of_right(q, d))
            m.update({"tokens": stats["tokens"], "calls": stats["calls"],
                      "truncated": stats["truncated"],
                      "embed_seconds": round(stats["seconds"], 3),
                      "compute_seconds": round(stats["compute_us"] / 1e6, 3),
                      "tokens_per_s": tokens_per_second(stats["tokens"], stats["seconds"]),
                      "score_seconds": round(time.perf_counter() - t0, 3)})
            entry["sets"][name] = m
            for k in total:
                total[k] += stats[k]
            print(f"  exit {ex} {name}: MRR@10 {m['mrr@10']:.4f} "
                  f"({stats['calls']} calls, {stats['seconds']:.1f} s)", file=sys.stderr, flush=True)
        entry.update({"tokens": total["tokens"], "calls": total["calls"],
                      "truncated": total["truncated"],
                      "embed_seconds": round(total["seconds"], 3),
                      "compute_seconds": round(total["compute_us"] / 1e6, 3),
                      "tokens_per_s": tokens_per_second(total["tokens"], total["seconds"]),
                      "engine_tokens_per_s": tokens_per_second(total["tokens"],
                                                               total["compute_us"] / 1e6)})
        results.append(entry)
    return results


def fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def print_table(report):
    names = list(report["sets"])
    head = f"{'exit':>4}"
    for n in names:
        head += f" | {n + ' MRR@10':>18} {'R@1':>6} {'R@10':>6}"
    head += f" | {'tokens/s':>9} {'engine tok/s':>12} {'tokens':>8} {'wall s':>7}"
    print(head)
    print("-" * len(head))
    for e in report["results"]:
        line = f"{e['exit']:>4}"
        for n in names:
            m = e["sets"][n]
            line += (f" | {fmt(m['mrr@10']):>18} {fmt(m['recall@1'], '.3f'):>6} "
                     f"{fmt(m['recall@10'], '.3f'):>6}")
        line += (f" | {fmt(e['tokens_per_s'], ',.0f'):>9} {fmt(e['engine_tokens_per_s'], ',.0f'):>12} "
                 f"{e['tokens']:>8} {e['embed_seconds']:>7.2f}")
        print(line)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for the method.")
    ap.add_argument("--target", default="127.0.0.1:50051", help="the server's host:port")
    ap.add_argument("--set", action="append", dest="sets", metavar="NAME=PATH",
                    help="a JSONL(.gz) set; repeatable; replaces the defaults "
                         + ", ".join(f"{n}={p}" for n, p in DEFAULT_SETS))
    ap.add_argument("--exits", help="comma-separated exits (default every exit 1..Info.num_layers)")
    ap.add_argument("--brick", action="append", default=[], metavar="ID[@VERSION][:WEIGHT]",
                    help="a brick for every call (ROUTING_EXPLICIT); repeatable; none = base model")
    ap.add_argument("--ffn_fraction", type=float, help="EmbedRequest.ffn_fraction (default unset = dense)")
    ap.add_argument("--instruction-query", default="", help="instruction of query calls")
    ap.add_argument("--instruction-document", default="", help="instruction of document calls")
    ap.add_argument("--max-inputs", type=int, default=0, help="first N pairs of each set (0 = all)")
    ap.add_argument("--batch", type=int, default=0,
                    help="inputs per Embed call (default and cap Info.max_client_batch)")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds per Embed call")
    ap.add_argument("--connect-timeout", type=float, default=10.0,
                    help="seconds to wait for the server: its port, then its model warm-up "
                         "(Info answers UNAVAILABLE until it serves)")
    ap.add_argument("--json", help="write the settings and every number here")
    args = ap.parse_args(argv)

    try:
        if args.batch < 0 or args.max_inputs < 0:
            raise UsageError("--batch and --max-inputs must be >= 0")
        if args.ffn_fraction is not None and not 0 < args.ffn_fraction <= 1:
            raise UsageError("--ffn_fraction must be in (0, 1]")
        bricks = [parse_brick(s) for s in args.brick]
        set_specs = [parse_set(s) for s in args.sets] if args.sets else list(DEFAULT_SETS)
        if len({n for n, _ in set_specs}) != len(set_specs):
            raise UsageError("--set names must differ")
        sets, set_info = {}, {}
        for name, path in set_specs:
            full = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
            in_repo = os.path.join(ROOT, path)
            if not os.path.exists(full) and not os.path.isabs(path) and os.path.exists(in_repo):
                full = in_repo  # defaults are relative to the repo
            sets[name] = load_pairs(full, args.max_inputs)
            set_info[name] = {"path": os.path.relpath(full, ROOT) if full.startswith(ROOT) else full,
                              "sha256": sha256_file(full), "n": len(sets[name])}

        try:
            client = Client(args, bricks)
        except ImportError as e:
            raise UsageError(f"needs grpcio and grpcio-tools ({e}); use .cache/e2e-venv/bin/python") from None
        client.connect()
        info = client.info
        exits = parse_exits(args.exits, info.num_layers)
        if bricks and not info.max_bricks_per_request:
            raise UsageError("the server has no brick store (Info.max_bricks_per_request 0; "
                             "start it with --brick_dir)")
        client.warm_up(sets, exits[-1])

        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": {"cpu": host_cpu(), "node": platform.node(),
                     "python": platform.python_version()},
            "settings": {"target": args.target,
                         "bricks": [format_brick(b) for b in bricks],
                         "bricks_served": client.served_bricks,
                         "ffn_fraction": args.ffn_fraction,
                         "instruction_query": args.instruction_query,
                         "instruction_document": args.instruction_document,
                         "exits": exits, "batch": client.batch, "deadline_s": args.deadline,
                         "max_inputs": args.max_inputs or None,
                         "scoring": f"numpy {np.__version__}" if np is not None else "pure Python"},
            "server": {"model_id": info.model_id, "version": info.version,
                       "device": info.device, "num_layers": info.num_layers,
                       "dimensions": info.dimensions, "pooling": info.pooling,
                       "max_input_tokens": info.max_input_tokens,
                       "max_client_batch": info.max_client_batch},
            "sets": set_info,
        }
        s, sv = report["settings"], report["server"]
        print(f"Kiln retrieval evaluation, {report['date']}, target {args.target}")
        print(f"server: {sv['model_id']}, kiln {sv['version']}, device {sv['device']}, "
              f"max_input_tokens {sv['max_input_tokens']}")
        print(f"client: {report['host']['cpu']}; scoring {s['scoring']}")
        served = ", ".join(f"{b['id']}@{b['version']}:{b['weight']:g}" for b in client.served_bricks)
        print(f"settings: bricks {served or 'none (base model)'}; ffn_fraction "
              f"{fmt(args.ffn_fraction, 'g') if args.ffn_fraction is not None else 'unset (dense)'}; "
              f"instructions query {args.instruction_query!r} document {args.instruction_document!r}; "
              f"batch {client.batch}; deadline {args.deadline:g} s")
        for name, si in set_info.items():
            print(f"set {name}: {si['path']}, {si['n']} pairs, sha256 {si['sha256'][:16]}...")
        print("embedding ...", file=sys.stderr, flush=True)
        report["results"] = evaluate(client, sets, exits)
    except UsageError as e:
        print(f"eval_retrieval: {e}", file=sys.stderr)
        return 2

    print()
    print_table(report)
    print("\ntokens/s: Embedding.tokens of every input at that exit / client wall time of its "
          "sequential Embed calls (gRPC included); engine tok/s: / sum of compute_time_us.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
