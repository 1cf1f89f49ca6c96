"""The seed comparison's evidence for each claim (examples/seed_evidence.py, beside the
example that uses it), on constructed numbers with known answers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from seed_evidence import claim_evidence, evidence_markdown, paired_difference  # noqa: E402


def test_paired_difference():
    d = paired_difference([0.9, 0.8, 0.7, 0.6], [0.5, 0.8, 0.9, 0.4])  # differences 0.4, 0, -0.2, 0.2
    assert d["mean"] == pytest.approx(0.1) and d["n"] == 4
    assert d["sem"] == pytest.approx((sum((x - 0.1) ** 2 for x in (0.4, 0, -0.2, 0.2)) / 3 / 4) ** 0.5)
    assert (d["wins"], d["losses"], d["ties"]) == (2, 1, 1)
    with pytest.raises(ValueError, match="matched"):
        paired_difference([1.0], [1.0, 2.0])


def test_claim_evidence_on_known_numbers():
    rows = [
        {"variant": v, "layer": 3, "fvu": fvu, "ce_recovered": ce}
        for v, fvu, ce in (("sae", 0.2, 0.8), ("transcoder", 0.5, 0.6), ("skip_transcoder", 0.25, 0.9))
    ]
    scores = {"sae": (0.6, 0.7), "transcoder": (0.8, 0.7), "skip_transcoder": (0.9, 0.6), "mlp_neurons": (0.5, 0.5)}
    probing = {
        "3": {
            "ks": [1],
            "feature_sets": list(scores),
            "tasks": {
                "a": {"scores": {s: {"1": v[0]} for s, v in scores.items()}},
                "b": {"scores": {s: {"1": v[1]} for s, v in scores.items()}},
                "skipped": {"skipped": "too few"},
            },
        }
    }

    def aggregate(detection, fuzzing, sem):
        return {"aggregate": {"detection": {"mean": detection, "sem": sem}, "fuzzing": {"mean": fuzzing, "sem": sem}}}

    interp = {"sae/layer3": aggregate(0.7, 0.6, 0.03), "transcoder/layer3": aggregate(0.8, 0.65, 0.04)}
    evidence = claim_evidence(rows, probing, interp)
    skip = evidence["reconstruction"]["skip_transcoder vs transcoder"]["3"]
    assert skip["fvu_ratio"] == pytest.approx(0.5) and skip["ce_recovered_difference"] == pytest.approx(0.3)
    tc_sae = evidence["probing"]["transcoder vs sae"]["1"]
    assert tc_sae["mean"] == pytest.approx(0.1) and (tc_sae["wins"], tc_sae["ties"], tc_sae["n"]) == (1, 1, 2)
    assert evidence["probing"]["skip_transcoder vs mlp_neurons"]["1"]["mean"] == pytest.approx(0.25)
    detection = evidence["autointerp"]["transcoder vs sae"]["detection"]
    assert detection["mean"] == pytest.approx(0.1) and detection["sem"] == pytest.approx(0.05)
    assert set(evidence["autointerp"]) == {"transcoder vs sae"}  # no skip-transcoder scores given
    text = evidence_markdown(evidence)
    assert "| transcoder vs sae | 1 | +0.100 ± 0.100 | 1 / 0 / 1 |" in text
    assert "| skip_transcoder vs transcoder | 3 | 0.250 / 0.500 | 0.500 |" in text
