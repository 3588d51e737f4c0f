"""The PEFT merge references of tools/make_brick_fixture.py: the merge
constants, a float64 re-implementation of what PEFT's add_weighted_adapter
computes (expected_merge), and the checked references built from PEFT
(merge_reference, merge_reference_unit) with their JSON documents.

make_brick_fixture.py is the command (usage, the bricks fx-a/fx-b and
brick_embeddings.json: its docstring); it writes, under tests/router/testdata/:
  merge_reference.json
      PEFT's add_weighted_adapter(["fx-a", "fx-b"], [0.6, 0.4]) with
      combination_type cat, ties_svd, dare_linear_svd and dare_ties_svd
      (density 1.0, svd_rank 6, majority_sign_method "total"): per method the
      merged adapter's rank / alpha / scale, for every encoder module the
      Frobenius norm of its dense delta (scale * B @ A) and of that delta minus
      the exact weighted sum sum_i w_i * scale_i * B_i @ A_i, four full rows of
      the dense delta of three modules, and the merged model's embeddings.
  merge_bricks/fx-c/1/{...}
  merge_bricks/fx-d/1/{...}
      Two more bricks, made like fx-a/fx-b, whose every module has scale
      exactly 1 (lora_alpha = r, no rsLoRA, no patterns), so that PEFT's *_svd
      merges, which apply each adapter's scale twice (below), compute the same
      thing as a merge of the task vectors B_i @ A_i with weights w_i:
        fx-c  r=2, lora_alpha=2, target_modules [query, value, intermediate.dense]
        fx-d  r=3, lora_alpha=3, target_modules [query, key, intermediate.dense]
      so query and intermediate.dense are merged from both, value from fx-c
      alone and key from fx-d alone. A separate folder, not bricks/: other
      tests serve bricks/ as a brick store and count what is in it.
  merge_reference_unit.json
      PEFT's add_weighted_adapter(["fx-c", "fx-d"], [0.6, 0.4]) with svd_rank
      5 (= 2 + 3) and majority_sign_method "total", one case per (method,
      density): ties_svd at density 1 and 0.5 (PEFT's trimming is
      deterministic, so a density below 1 is a valid reference for ties),
      dare_linear_svd and dare_ties_svd at density 1 (DARE's drops come from
      torch's RNG, which no other implementation reproduces). Per case the
      same fields as merge_reference.json: per-module Frobenius norms, three
      full rows of four modules, and the merged model's embeddings.
      The seeds of fx-c/fx-d are such that no entry near the trim threshold
      or with a near-zero sign-election sum changes side between PEFT's
      float32 and the float64 re-implementation (the 1e-5 check below would
      fail if one did).

What PEFT 0.13.2 computes in add_weighted_adapter (peft/tuners/lora/model.py,
LoraModel.add_weighted_adapter, _check_add_weighted_adapter,
_svd_generalized_task_arithmetic_weighted_adapter; peft/utils/merge_utils.py).
Notation: adapters i = 1..n in the order passed, weights w_i, per-module
scale s_i (LoraLayer.update_layer: alpha/r, or alpha/sqrt(r) under rsLoRA,
with r and alpha from rank_pattern/alpha_pattern), A_i [r_i, in], B_i
[out, r_i], task vector D_i = s_i * B_i @ A_i (LoraLayer.get_delta_weight).
A module is merged from the adapters that have a LoRA on it; the others are
skipped for that module (n below counts only those).

  The merged adapter's config (add_weighted_adapter): a copy of the FIRST
  adapter's LoraConfig with r = lora_alpha = new_rank and target_modules the
  union of the adapters' sets (_check_add_weighted_adapter). Everything else
  (use_rslora, rank_pattern, alpha_pattern) comes from adapter 1, so its
  scale is new_rank/new_rank = 1 when adapter 1 is plain LoRA without
  patterns (fx-a here, asserted), but sqrt(new_rank) if adapter 1 uses
  rsLoRA, and adapter 1's pattern ranks if it has a rank_pattern (which then
  breaks the copy below). Merged dense delta = 1 * B' @ A'.

  cat (add_weighted_adapter, "cat" branch): new_rank = sum of the adapters'
    CONFIG-LEVEL r (not per-module ranks). A' = rows [w_1 s_1 A_1; w_2 s_2
    A_2; ...] (the weight and scale go on A; B is not scaled), B' = columns
    [B_1, B_2, ...], written into the first rows/columns of zeroed [new_rank,
    in] / [out, new_rank] tensors; leftover rows/columns stay zero (a module
    only one adapter has; fx-b's rank-1 value). Result: B' A' = sum_i w_i D_i
    exactly, the linear composition Kiln runs. A module whose per-module
    ranks add up to more than new_rank makes PEFT raise a shape error.

  *_svd (_svd_generalized_task_arithmetic_weighted_adapter): the weights it
    passes to merge_utils are w_i * s_i, and the tensors are D_i, which
    already contain s_i, so the scale is applied TWICE: the combination acts
    on T_i = D_i and weights v_i = w_i * s_i, i.e. on w_i s_i^2 B_i A_i.
    (For fx-a s = 2, for fx-b s = 2*sqrt(2) or 3 on value; so PEFT's svd
    merges are far from the exact weighted sum; the norms in the file show
    it.) The combined dense matrix M (below, per method) is then
    factorised: U, S, Vh = torch.linalg.svd(M, full_matrices=True); B' =
    U[:, :k] @ diag(S[:k]), A' = Vh[:k, :], k = new_rank = svd_rank (default
    the largest config-level r); no clamping unless svd_clamp is given. The
    merged dense delta is the best rank-k approximation of M (scale 1).
    M per combination type:
      ties_svd (merge_utils.ties): (1) trim: each T_i separately keeps its
        top int(density * numel) entries by |value| and zeroes the rest
        (magnitude_based_pruning; density >= 1 means no trimming at all,
        merge_utils.prune returns the tensor unchanged); (2) elect: per entry
        the majority sign is sign(sum_i T_i) for "total" (sign(sum_i
        sign(T_i)) for "frequency"), from the trimmed, UNWEIGHTED tensors, a
        sum of exactly 0 electing +1; (3) mask_i = (sign(T_i) == elected), so
        zero entries never count; (4) disjoint mean: M = sum_i mask_i v_i T_i
        / max(1, sum_i mask_i). Weights are applied after trimming and
        election; the result is a MEAN over agreeing adapters, not a sum
        (where both agree it is (v_1 T_1 + v_2 T_2) / 2).
      dare_linear_svd (merge_utils.dare_linear): each T_i is randomly
        pruned, keeping each entry with probability density (torch.bernoulli,
        global torch RNG), then M = sum_i v_i T_i. The 1/density rescale is a
        no-op in PEFT 0.13.2 (random_pruning computes torch.div and discards
        the result), so kept entries are NOT rescaled. With density >= 1
        nothing is pruned (prune returns early), so M = sum_i v_i T_i, the
        plain task-arithmetic sum, as for "svd".
      dare_ties_svd (merge_utils.dare_ties): the same random pruning (no
        rescale), then steps (2)-(4) of ties. With density 1 it equals
        ties_svd.
    In trim step (1), torch.topk keeps exactly k entries (its choice among
    entries tied with the k-th largest |value| is unspecified), and k comes
    from the float density in double precision: int(0.5 * numel).
    A module that only one adapter has gets M = v_1 T_1 (ties: the mask keeps
    every non-zero entry and the mean divides by 1).

  Not used here: "linear"/"ties"/"dare_*"/"magnitude_prune" without _svd
  (_generalized_task_arithmetic_weighted_adapter) need equal r and combine A
  and B SEPARATELY with weights sqrt(w_i * s_i): B' A' = (sum_i c_i B_i)
  (sum_i c_i A_i), which has cross terms, and is NaN for a negative weight.

expected_merge re-implements the four combinations above from the bricks' own
tensors in float64, and merge_reference / merge_reference_unit assert that
PEFT's merged dense deltas match it (relative Frobenius error < 1e-5), so
this comment is checked on every run of make_brick_fixture.py.
"""
import sys
import warnings

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer


MERGE_WEIGHTS = [("fx-a", 0.6), ("fx-b", 0.4)]
MERGE_METHODS = ["cat", "ties_svd", "dare_linear_svd", "dare_ties_svd"]
MERGE_DENSITY = 1.0
MERGE_SVD_RANK = 6  # 4 + 2
MERGE_SIGN_METHOD = "total"
# The scale-1 bricks and the cases of merge_reference_unit.json.
UNIT_BRICKS = {
    "fx-c": dict(
        config=dict(r=2, lora_alpha=2, target_modules=["query", "value", "intermediate.dense"]),
        seed=3003, init_a=0.4, init_b=0.4,
        modules=[("attention.self.query", 2), ("attention.self.value", 2),
                 ("intermediate.dense", 2)], pooler_rank=None,
        description="Test fixture: random LoRA of scale 1 (r=2, alpha=2) on query, value and "
                    "intermediate.dense.",
        query=["Represent this sentence for searching relevant passages:"],
        document=["Represent this passage:"]),
    "fx-d": dict(
        config=dict(r=3, lora_alpha=3, target_modules=["query", "key", "intermediate.dense"]),
        seed=4005, init_a=0.35, init_b=0.35,
        modules=[("attention.self.query", 3), ("attention.self.key", 3),
                 ("intermediate.dense", 3)], pooler_rank=None,
        description="Test fixture: random LoRA of scale 1 (r=3, alpha=3) on query, key and "
                    "intermediate.dense.",
        query=["Represent this question for retrieval:"],
        document=["Represent this document:"]),
}
UNIT_MERGE_WEIGHTS = [("fx-c", 0.6), ("fx-d", 0.4)]
UNIT_MERGE_CASES = [("ties_svd", 1.0), ("ties_svd", 0.5), ("dare_linear_svd", 1.0),
                    ("dare_ties_svd", 1.0)]
UNIT_MERGE_SVD_RANK = 5  # 2 + 3
UNIT_SAMPLE_MODULES = ["encoder.layer.0.attention.self.query",
                       "encoder.layer.5.intermediate.dense",
                       "encoder.layer.2.attention.self.value",
                       "encoder.layer.3.attention.self.key"]

# Modules whose dense merged delta is sampled (four full rows each).
SAMPLE_MODULES = ["encoder.layer.0.attention.self.query",
                  "encoder.layer.5.intermediate.dense",
                  "encoder.layer.2.attention.self.value"]


# --------------------------------------------------------------------------
# Merges


def magnitude_trim(t, density):
    """ties' step (1): keep the top int(density * numel) entries by |value|."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def expected_merge(method, parts, density=MERGE_DENSITY, k=MERGE_SVD_RANK):
    """The merged dense delta that the comment at the top says PEFT computes,
    in float64. parts: [(w_i, s_i, D_i)] of the adapters that have the
    module, in adapter order. DARE only at density 1 (random otherwise)."""
    if method == "cat":
        return sum(w * d for w, _, d in parts)
    assert method == "ties_svd" or density >= 1, (method, density)
    ts = torch.stack([magnitude_trim(d, density) for _, _, d in parts])  # T_i = D_i, trimmed
    vs = torch.tensor([w * s for w, s, _ in parts], dtype=torch.float64).view(-1, 1, 1)
    if method == "dare_linear_svd":
        m = (ts * vs).sum(0)
    else:  # ties_svd, dare_ties_svd with majority_sign_method "total"
        elected = torch.where(ts.sum(0) >= 0, 1.0, -1.0).to(torch.float64)
        mask = (ts.sign() == elected).to(torch.float64)
        m = (ts * vs * mask).sum(0) / mask.sum(0).clamp(min=1.0)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def merge_reference(base, brick_dirs, brick_deltas, input_ids, embed):
    """merge_reference.json's methods: PEFT's merges of fx-a and fx-b, checked
    against expected_merge. base: a freshly loaded base model (PEFT wraps it);
    brick_dirs: brick id -> version folder; brick_deltas: brick id ->
    read_brick_deltas(); embed(model, input_ids) -> [texts, dim] embeddings.
    Each method's "embeddings" is a tensor (merge_reference_doc lists it)."""
    model = PeftModel.from_pretrained(base, brick_dirs["fx-a"], adapter_name="fx-a").eval()
    model.load_adapter(brick_dirs["fx-b"], adapter_name="fx-b")
    adapters = [b for b, _ in MERGE_WEIGHTS]
    weights = [w for _, w in MERGE_WEIGHTS]
    out = {}
    for method in MERGE_METHODS:
        name = "merged-" + method
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "density 1.0 ... no pruning"
            model.add_weighted_adapter(adapters, weights, name, combination_type=method,
                                       svd_rank=MERGE_SVD_RANK, density=MERGE_DENSITY,
                                       majority_sign_method=MERGE_SIGN_METHOD)
        mcfg = model.peft_config[name]
        modules, samples = {}, {}
        worst_rel = 0.0
        for mod_name, mod in model.base_model.model.named_modules():
            if not isinstance(mod, LoraLayer) or name not in mod.lora_A:
                continue
            if not mod_name.startswith("encoder."):
                continue  # pooler.dense: merged too, but Kiln ignores it
            assert mod.scaling[name] == 1.0, (method, mod_name, mod.scaling[name])
            with torch.no_grad():
                got = mod.get_delta_weight(name).double()
            parts = [(w, *brick_deltas[b][mod_name]) for b, w in MERGE_WEIGHTS
                     if mod_name in brick_deltas[b]]
            exact = sum(w * d for w, _, d in parts)
            want = expected_merge(method, parts)
            rel = ((got - want).norm() / want.norm()).item()
            assert rel < 1e-5, (method, mod_name, rel)
            worst_rel = max(worst_rel, rel)
            modules[mod_name] = {
                "rank": int(mod.r[name]),
                "adapters": [b for b, _ in MERGE_WEIGHTS if mod_name in brick_deltas[b]],
                "delta_norm": got.norm().item(),
                "diff_to_weighted_sum_norm": (got - exact).norm().item(),
            }
            if mod_name in SAMPLE_MODULES:
                rows = [0, 1, got.shape[0] // 2, got.shape[0] - 1]
                samples[mod_name] = {"shape": list(got.shape), "rows": rows,
                                     "values": [got[r].tolist() for r in rows]}
        assert sorted(samples) == sorted(SAMPLE_MODULES)
        print(f"merge {method}: PEFT vs the semantics above, worst relative error "
              f"{worst_rel:.2e}", file=sys.stderr)
        model.set_adapter(name)
        emb = embed(model, input_ids)
        out[method] = {
            "new_rank": int(mcfg.r),
            "new_lora_alpha": mcfg.lora_alpha,
            "new_use_rslora": bool(mcfg.use_rslora),
            "new_scale": 1.0,
            "modules": modules,
            "delta_rows": {m: samples[m] for m in SAMPLE_MODULES},
            "embeddings": emb,
        }
    return out


def merge_reference_unit(base, brick_dirs, brick_deltas, input_ids, embed):
    """merge_reference_unit.json's cases: PEFT's *_svd merges of the scale-1
    bricks fx-c and fx-d, checked against expected_merge. Arguments as for
    merge_reference."""
    (first, _), (second, _) = UNIT_MERGE_WEIGHTS
    model = PeftModel.from_pretrained(base, brick_dirs[first], adapter_name=first).eval()
    model.load_adapter(brick_dirs[second], adapter_name=second)
    for name, mod in model.base_model.model.named_modules():
        if isinstance(mod, LoraLayer):
            for b in mod.lora_A:
                assert mod.scaling[b] == 1.0, (name, b, mod.scaling[b])
    adapters = [b for b, _ in UNIT_MERGE_WEIGHTS]
    weights = [w for _, w in UNIT_MERGE_WEIGHTS]
    cases = []
    for method, density in UNIT_MERGE_CASES:
        name = f"merged-{method}-d{round(density * 100)}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "density 1.0 ... no pruning"
            model.add_weighted_adapter(adapters, weights, name, combination_type=method,
                                       svd_rank=UNIT_MERGE_SVD_RANK, density=density,
                                       majority_sign_method=MERGE_SIGN_METHOD)
        mcfg = model.peft_config[name]
        modules, samples = {}, {}
        worst_rel = 0.0
        for mod_name, mod in model.base_model.model.named_modules():
            if not isinstance(mod, LoraLayer) or name not in mod.lora_A:
                continue
            assert mod_name.startswith("encoder."), mod_name
            assert mod.scaling[name] == 1.0, (method, mod_name, mod.scaling[name])
            with torch.no_grad():
                got = mod.get_delta_weight(name).double()
            parts = [(w, *brick_deltas[b][mod_name]) for b, w in UNIT_MERGE_WEIGHTS
                     if mod_name in brick_deltas[b]]
            assert all(s == 1.0 for _, s, _ in parts)
            exact = sum(w * d for w, _, d in parts)
            want = expected_merge(method, parts, density, UNIT_MERGE_SVD_RANK)
            rel = ((got - want).norm() / want.norm()).item()
            assert rel < 1e-5, (method, density, mod_name, rel)
            worst_rel = max(worst_rel, rel)
            modules[mod_name] = {
                "rank": int(mod.r[name]),
                "adapters": [b for b, _ in UNIT_MERGE_WEIGHTS if mod_name in brick_deltas[b]],
                "delta_norm": got.norm().item(),
                "diff_to_weighted_sum_norm": (got - exact).norm().item(),
            }
            if mod_name in UNIT_SAMPLE_MODULES:
                rows = [0, got.shape[0] // 2, got.shape[0] - 1]
                samples[mod_name] = {"shape": list(got.shape), "rows": rows,
                                     "values": [got[r].tolist() for r in rows]}
        assert sorted(samples) == sorted(UNIT_SAMPLE_MODULES)
        print(f"unit merge {method} density {density:g}: PEFT vs the semantics above, "
              f"worst relative error {worst_rel:.2e}", file=sys.stderr)
        model.set_adapter(name)
        cases.append({
            "name": f"{method}@{density:g}",
            "combination_type": method,
            "density": density,
            "new_rank": int(mcfg.r),
            "new_lora_alpha": mcfg.lora_alpha,
            "new_use_rslora": bool(mcfg.use_rslora),
            "new_scale": 1.0,
            "modules": modules,
            "delta_rows": {m: samples[m] for m in UNIT_SAMPLE_MODULES},
            "embeddings": embed(model, input_ids),
        })
    return cases


# --------------------------------------------------------------------------
# The JSON documents

# Where the committed fixtures say the merge semantics are written down; the
# docstring of make_brick_fixture.py points on to this module's.
SEMANTICS = "tools/make_brick_fixture.py, comment at the top"


def merge_reference_doc(header, texts, merges, base_emb):
    """merge_reference.json: header (model, fingerprint, generator), then the
    call, the texts and merge_reference's methods. Adds mean_cos_to_base to
    each method in merges and turns its embeddings into lists."""
    doc = dict(header)
    doc.update({
        "call": "add_weighted_adapter(adapters, weights, name, combination_type=METHOD, "
                f"svd_rank={MERGE_SVD_RANK}, density={MERGE_DENSITY}, "
                f"majority_sign_method=\"{MERGE_SIGN_METHOD}\")",
        "semantics": SEMANTICS,
        "adapters": [b for b, _ in MERGE_WEIGHTS],
        "weights": [w for _, w in MERGE_WEIGHTS],
        "svd_rank": MERGE_SVD_RANK,
        "density": MERGE_DENSITY,
        "majority_sign_method": MERGE_SIGN_METHOD,
        "note": "modules: encoder modules only (PEFT also merges fx-a's pooler.dense, which "
                "Kiln ignores). delta = the merged adapter's scale * B @ A; "
                "diff_to_weighted_sum_norm = ||delta - sum_i w_i * scale_i * B_i @ A_i||_F. "
                "delta_rows: full rows `rows` of delta, shape [out, in]. embeddings: texts and "
                "input_ids of brick_embeddings.json.",
        "texts": texts,
        "methods": {},
    })
    for method, m in merges.items():
        c = (m["embeddings"] * base_emb).sum(1).mean().item()
        m["mean_cos_to_base"] = c
        m["embeddings"] = m["embeddings"].tolist()
        doc["methods"][method] = m
    return doc


def merge_reference_unit_doc(header, texts, unit_cases, base_emb):
    """merge_reference_unit.json, as merge_reference_doc for
    merge_reference_unit's cases (which it updates the same way)."""
    doc = dict(header)
    doc.update({
        "call": "add_weighted_adapter(adapters, weights, name, combination_type=CASE."
                f"combination_type, svd_rank={UNIT_MERGE_SVD_RANK}, density=CASE.density, "
                f"majority_sign_method=\"{MERGE_SIGN_METHOD}\")",
        "semantics": SEMANTICS,
        "bricks": {b: f"merge_bricks/{b}/1" for b in UNIT_BRICKS},
        "adapters": [b for b, _ in UNIT_MERGE_WEIGHTS],
        "weights": [w for _, w in UNIT_MERGE_WEIGHTS],
        "svd_rank": UNIT_MERGE_SVD_RANK,
        "majority_sign_method": MERGE_SIGN_METHOD,
        "note": "Every module of fx-c and fx-d has scale 1, so PEFT's *_svd merges equal the "
                "TIES / DARE merges of the task vectors B_i @ A_i with weights w_i, then SVD "
                "to svd_rank on EVERY module (also those only one brick has). modules, "
                "delta_rows, embeddings: as in merge_reference.json (delta_rows: three full "
                "rows of four modules).",
        "texts": texts,
        "cases": [],
    })
    for c in unit_cases:
        c["mean_cos_to_base"] = (c["embeddings"] * base_emb).sum(1).mean().item()
        c["embeddings"] = c["embeddings"].tolist()
        doc["cases"].append(c)
    return doc


def worst_ratio(modules):
    """max over modules of ||delta - weighted sum|| / ||delta||."""
    return max(v["diff_to_weighted_sum_norm"] / max(v["delta_norm"], 1e-30)
               for v in modules.values())
