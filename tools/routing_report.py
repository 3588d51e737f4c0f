"""What tools/eval_routing.py prints: its two tables, (a) routing accuracy
with every misroute and false route, and (b) end-to-end retrieval with the
AUTO gap, each with its verdict against the issue's targets. Standard
library only."""
from eval_retrieval import fmt

ROUTING_TARGET = 0.90
AUTO_GAP_TARGET_POINTS = 1.0


def print_routing(r):
    print("\n== (a) routing accuracy (plan == [task's brick]) ==")
    print(f"{'task/side':<28} {'n':>4} {'correct':>8} {'accuracy':>9} {'top1 cand':>10}")
    for k, v in r["per_task_side"].items():
        print(f"{k:<28} {v['n']:>4} {v['correct']:>8} {fmt(v['accuracy']):>9} "
              f"{v['top1_candidate_correct']:>10}")
    acc = r["accuracy"]
    verdict = "PASS" if acc is not None and acc >= ROUTING_TARGET else "MISS"
    print(f"{'overall':<28} {r['n']:>4} {r['correct']:>8} {fmt(acc):>9} "
          f"{r['top1_candidate_correct']:>10}   target >= {ROUTING_TARGET:.2f}: {verdict}")
    if r["misroutes"]:
        print(f"\nmisroutes ({len(r['misroutes'])}):")
        for m in r["misroutes"]:
            chosen = ",".join(c["id"] for c in m["chosen"]) or "(base model)"
            cands = "  ".join(f"{c['id']}={c['score']:.3f}/{c['side'][:1]}"
                              for c in m["candidates"][:3])
            print(f"  [{m['task']}/{m['side']}] {m['instruction']!r}\n"
                  f"      -> {chosen}; {cands}; {m['reason']}")
    for e in r["errors"]:
        print(f"  error [{e['task']}/{e['side']}] {e['instruction']!r}: {e['error']}")
    u = r.get("unrelated")
    if u:
        print(f"\nunrelated instructions routed to a brick: {u['routed_to_brick']} of {u['n']} "
              f"(best score among them {fmt(u['max_top_score'], '.3f')})")
        for f in u["false_routes"]:
            print(f"  {f['instruction']!r} -> {','.join(f['chosen'])} ({f['top_score']:.3f})")
        for e in u.get("errors", []):
            print(f"  error {e['instruction']!r}: {e['error']}")


def print_retrieval(ret):
    print("\n== (b) end-to-end retrieval, MRR@10 (R@1) ==")
    print(f"{'task':<16} {'n':>4} {'QUALITY.md':>10} {'explicit-manifest':>19} "
          f"{'auto':>17} {'explicit-same-text':>19} {'auto-same (pts)':>16} {'wrong-brick calls':>18}")
    gaps = []
    for task, e in ret.items():
        s = e["settings"]

        def cell(name):
            v = s[name]
            return "error" if "error" in v else f"{v['mrr@10']:.4f} ({v['recall@1']:.3f})"
        au = s["auto"]
        wrong = (f"{au['embed']['wrong_brick_calls']}/{au['embed']['calls']}"
                 if "embed" in au else "-")
        gap = e["auto_minus_explicit_same_text_points"]
        if gap is not None:
            gaps.append(gap)
        print(f"{task:<16} {e['n']:>4} {fmt(e['quality_md_brick_plus_instructions'], '.3f'):>10} "
              f"{cell('explicit-manifest'):>19} {cell('auto'):>17} {cell('explicit-same-text'):>19} "
              f"{fmt(gap, '+.2f'):>16} {wrong:>18}")
    for task, e in ret.items():
        au = e["settings"]["auto"]
        if "embed" in au:
            print(f"  {task}: auto plans per call {au['embed']['plans']}"
                  + (f"; wrong: {au['embed']['wrong_examples'][:5]}"
                     if au['embed']['wrong_examples'] else ""))
        for name, v in e["settings"].items():
            if v.get("embed", {}).get("routing_field_mismatch"):
                print(f"  {task}: {name}: {v['embed']['routing_field_mismatch']} responses with an "
                      f"unexpected EmbedResponse.routing")
        m = e["explicit_manifest_minus_quality_md_points"]
        if m is not None:
            print(f"  {task}: explicit-manifest - QUALITY.md = {m:+.2f} points")
    if gaps:
        worst = min(gaps)
        verdict = "PASS" if worst >= -AUTO_GAP_TARGET_POINTS else "MISS"
        print(f"worst auto - explicit-same-text: {worst:+.2f} points "
              f"(target >= -{AUTO_GAP_TARGET_POINTS:.0f}): {verdict}")
    return gaps
