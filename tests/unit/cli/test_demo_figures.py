"""The demo's figures block: the verification tables appear when their methods ran."""

from __future__ import annotations

from neurodissect.v1 import common_pb2

from services.cli.demo_figures import BEGIN, END, figures_block


def _job(*summaries: common_pb2.LayerSummary) -> common_pb2.Job:
    return common_pb2.Job(
        spec=common_pb2.DissectionSpec(layers=[s.layer for s in summaries]), summary=summaries
    )


def test_occlusion_and_ablation_tables_per_layer() -> None:
    layer2 = common_pb2.LayerSummary(
        layer="layer2", units=64, methods=["occlusion", "ablation"],
        ablation_note="not scored: its pooled activations do not feed the head",
        occlusion=common_pb2.OcclusionSummary(
            fill="mean", regions=400, mean_correlation=0.31, detectors_tested=4,
            detectors_dropping=0.5, forward_passes=520, seconds=3.25),
    )
    layer3 = common_pb2.LayerSummary(
        layer="layer3", units=64, methods=["occlusion", "ablation"],
        occlusion=common_pb2.OcclusionSummary(fill="mean", regions=400, forward_passes=520),
        ablation_mean={"netdissect": 0.2, "linear": 0.4},
        ablation_sem={"netdissect": 0.03, "linear": 0.02},
    )
    block = figures_block(_job(layer2, layer3), {})
    lines = block.splitlines()
    assert lines[0] == BEGIN and lines[-1] == END
    # No seconds: the block reads the same on every machine.
    assert "| layer2 | mean | 400 | 0.310 | 50% of 4 | 520 |" in lines
    no_detector = "— (no detector's label was occluded)"
    assert f"| layer3 | mean | 400 | 0.000 | {no_detector} | 520 |" in lines
    assert "| method | layer2 | layer3 |" in lines
    assert "| linear | — | 0.400 ± 0.020 |" in lines
    assert "layer2: not scored: its pooled activations do not feed the head" in lines


def test_significance_and_sweep_tables_per_layer() -> None:
    layer = common_pb2.LayerSummary(
        layer="layer3", units=64, detectors=15, significant_detectors=12,
        methods=["netdissect", "significance", "threshold_sweep"],
        sweep=[common_pb2.SweepPoint(threshold=0.001, detectors=1, unique_labels=1,
                                     unchanged_fraction=0.5),
               common_pb2.SweepPoint(threshold=0.005, detectors=15, unique_labels=8,
                                     unchanged_fraction=1.0)],
    )
    lines = figures_block(_job(layer), {}).splitlines()
    assert "| layer3 | 15 | 12 |" in lines
    assert "| 0.001 | 1 / 1 / 50% |" in lines
    assert "| 0.005 | 15 / 8 / 100% |" in lines


def test_no_verification_no_tables() -> None:
    block = figures_block(_job(common_pb2.LayerSummary(layer="l", methods=["netdissect"])), {})
    for title in ("Occlusion", "Ablation", "significance", "Threshold sweep"):
        assert title not in block
