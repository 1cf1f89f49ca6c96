"""The evidence for the seed paper's claims, from the seed comparison's results
(`examples/seed_comparison.py` and its notebook use it; it is not part of the library).

    evidence = claim_evidence(rows, probing_by_layer, autointerp_by_dictionary)
    print(evidence_markdown(evidence))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from tl_transcoders.analysis.comparison import VARIANTS
from tl_transcoders.evaluation.statistics import mean_and_sem

PAIRS: tuple[tuple[str, str], ...] = (
    ("transcoder", "sae"),
    ("skip_transcoder", "transcoder"),
    ("skip_transcoder", "sae"),
)
"""The comparisons behind the seed paper's claims, as (variant, against)."""


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Summary of a - b over matched items (e.g. the same task at the same layer): mean,
    standard error (sample std / sqrt(n); NaN for n < 2), n, and how many items a wins,
    loses and ties."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs matched items, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    mean, sem = mean_and_sem(d)
    return {
        "mean": mean,
        "sem": sem,
        "n": len(d),
        "wins": sum(v > 0 for v in d),
        "losses": sum(v < 0 for v in d),
        "ties": sum(v == 0 for v in d),
    }


def claim_evidence(
    rows: Sequence[dict],
    probing: Mapping[str, dict] | None = None,
    autointerp: Mapping[str, dict] | None = None,
) -> dict:
    """The numbers behind the seed paper's two claims, for each pair in `PAIRS`.

    - "reconstruction": per layer, FVU of each (its ratio: below 1, the first variant
      reconstructs better) and CE recovered (difference: above 0, the first is better),
      from `compare_variants` rows.
    - "probing" (with `probing`, `{layer: probe_dictionaries table}`): for each k, the
      `paired_difference` of balanced accuracy over every (layer, task) scored for both;
      each variant is also compared with "mlp_neurons" when that set was probed.
    - "autointerp" (with `autointerp`, `{"variant/layerL": {"aggregate": ...}}` as the
      seed comparison writes it): for detection and fuzzing, per layer the difference of
      mean balanced accuracy and its standard error (the two s.e. in quadrature), and
      the mean over layers with its s.e.
    Pairs whose variants are missing are left out."""
    by_key = {(r["variant"], r["layer"]): r for r in rows}
    layers = sorted({r["layer"] for r in rows})
    evidence: dict = {"reconstruction": {}, "probing": {}, "autointerp": {}}
    for a, b in PAIRS:
        common = [layer for layer in layers if (a, layer) in by_key and (b, layer) in by_key]
        if common:
            evidence["reconstruction"][f"{a} vs {b}"] = {
                str(layer): {
                    "fvu": [by_key[a, layer]["fvu"], by_key[b, layer]["fvu"]],
                    "fvu_ratio": by_key[a, layer]["fvu"] / by_key[b, layer]["fvu"],
                    "ce_recovered": [by_key[a, layer]["ce_recovered"], by_key[b, layer]["ce_recovered"]],
                    "ce_recovered_difference": by_key[a, layer]["ce_recovered"] - by_key[b, layer]["ce_recovered"],
                }
                for layer in common
            }
    if probing:
        sets = {s for table in probing.values() for s in table["feature_sets"]}
        pairs = list(PAIRS) + [(v, "mlp_neurons") for v in VARIANTS if "mlp_neurons" in sets]
        ks = next(iter(probing.values()))["ks"]
        for a, b in pairs:
            if a not in sets or b not in sets:
                continue
            scored = [
                t["scores"]
                for table in probing.values()
                for t in table["tasks"].values()
                if a in t.get("scores", {}) and b in t.get("scores", {})
            ]
            evidence["probing"][f"{a} vs {b}"] = {
                str(k): paired_difference([s[a][str(k)] for s in scored], [s[b][str(k)] for s in scored]) for k in ks
            }
    if autointerp:
        for a, b in PAIRS:
            found = {}
            for layer in layers:
                key_a, key_b = f"{a}/layer{layer}", f"{b}/layer{layer}"
                if key_a in autointerp and key_b in autointerp:
                    found[str(layer)] = (autointerp[key_a]["aggregate"], autointerp[key_b]["aggregate"])
            if not found:
                continue
            entry = {}
            for kind in ("detection", "fuzzing"):
                per_layer = {
                    layer: {
                        "difference": x[kind]["mean"] - y[kind]["mean"],
                        "sem": math.hypot(x[kind]["sem"], y[kind]["sem"]),
                    }
                    for layer, (x, y) in found.items()
                }
                n = len(per_layer)
                entry[kind] = {
                    "by_layer": per_layer,
                    "mean": sum(v["difference"] for v in per_layer.values()) / n,
                    "sem": math.sqrt(sum(v["sem"] ** 2 for v in per_layer.values())) / n,
                }
            evidence["autointerp"][f"{a} vs {b}"] = entry
    return evidence


def evidence_markdown(evidence: dict) -> str:
    """`claim_evidence` as Markdown tables."""
    lines = []
    if evidence["reconstruction"]:
        lines += [
            "### Reconstruction (FVU ratio below 1 and CE-recovered difference above 0: the first is better)",
            "",
            "| pair | layer | FVU | FVU ratio | CE recovered | difference |",
            "|---|---|---|---|---|---|",
        ]
        for pair, by_layer in evidence["reconstruction"].items():
            for layer, v in by_layer.items():
                lines.append(
                    f"| {pair} | {layer} | {v['fvu'][0]:.3f} / {v['fvu'][1]:.3f} | {v['fvu_ratio']:.3f} | "
                    f"{v['ce_recovered'][0]:.3f} / {v['ce_recovered'][1]:.3f} | "
                    f"{v['ce_recovered_difference']:+.3f} |"
                )
        lines.append("")
    if evidence["probing"]:
        lines += [
            "### Sparse probing: balanced-accuracy difference over (layer, task) pairs",
            "",
            "| pair | k | mean difference ± s.e. | wins / losses / ties |",
            "|---|---|---|---|",
        ]
        for pair, by_k in evidence["probing"].items():
            for k, v in by_k.items():
                lines.append(
                    f"| {pair} | {k} | {v['mean']:+.3f} ± {v['sem']:.3f} | {v['wins']} / {v['losses']} / {v['ties']} |"
                )
        lines.append("")
    if evidence["autointerp"]:
        lines += [
            "### Autointerp: balanced-accuracy difference, mean over layers ± s.e.",
            "",
            "| pair | detection | fuzzing |",
            "|---|---|---|",
        ]
        for pair, v in evidence["autointerp"].items():
            lines.append(
                f"| {pair} | {v['detection']['mean']:+.3f} ± {v['detection']['sem']:.3f} | "
                f"{v['fuzzing']['mean']:+.3f} ± {v['fuzzing']['sem']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)
