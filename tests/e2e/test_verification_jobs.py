"""The checks of NetDissect's labels end to end through the gateway, on the four real services.

The planted model's `colors` units fire exactly on their palette colour (unit 8 never
fires): dissected with a threshold sweep and detector significance, every planted unit
must pass Benjamini–Hochberg with p < 1e-6, the dead unit must not, and the sweep's
point at the job's own threshold must leave every label unchanged. The per_image mode
runs the same checks on per-image percentiles.
"""

from __future__ import annotations

import csv
import io

import pytest
from neurodissect.v1 import common_pb2

from services.cli.stack import LocalStack
from services.gateway.client import NeurodissectClient
from services.toyworld.planted import DEAD_UNIT, planted_units

pytestmark = pytest.mark.timeout(1800)

IMAGES, SIZE = 100, 32


def _planted_spec(netdissect: common_pb2.NetDissectParams,
                  sweep: common_pb2.ThresholdSweepParams) -> common_pb2.DissectionSpec:
    return common_pb2.DissectionSpec(
        name="planted colour units, verified",
        model=common_pb2.ModelSpec(source="toy", name="planted"),
        layers=["colors"],
        dataset=common_pb2.DatasetSpec(
            kind="toyworld", toyworld=common_pb2.ToyWorldParams(n_images=IMAGES, image_size=SIZE)
        ),
        netdissect=netdissect,
        threshold_sweep=sweep,
        significance=common_pb2.SignificanceParams(permutations=20),
    )


def test_planted_units_are_significant_and_stable_around_their_threshold(
    platform: LocalStack,
) -> None:
    spec = _planted_spec(
        common_pb2.NetDissectParams(top_quantile=0.1),
        common_pb2.ThresholdSweepParams(quantiles=[0.05, 0.1, 0.2]),
    )
    with NeurodissectClient(platform.settings) as client:
        job = client.wait(client.submit(spec).id)
        assert job.state == common_pb2.SUCCEEDED, job.error
        units = {u.unit: u for u in client.units(job.id, "colors")}
        passing = {u.unit for u in client.units(job.id, "colors", significant_only=True)}
        sweep_csv = client.export(job.id, "colors", "sweep")
        significance_csv = client.export(job.id, "colors", "significance")
    for unit, colour in planted_units().items():
        sig = units[unit].significance
        assert (sig.label, sig.significant) == (colour, True), unit
        assert sig.p_value < 1e-6 and sig.iou > sig.expected_iou, (unit, sig.p_value)
        assert sig.permutation_p == pytest.approx(1 / 21)
    assert not units[DEAD_UNIT].significance.significant
    assert passing == set(planted_units())
    (summary,) = job.summary
    assert summary.significant_detectors == summary.detectors == len(planted_units())
    assert [p.threshold for p in summary.sweep] == [0.05, 0.1, 0.2]
    assert summary.sweep[1].unchanged_fraction == 1.0
    assert summary.sweep[1].detectors == summary.detectors
    assert len(list(csv.DictReader(io.StringIO(sweep_csv)))) == 3
    assert len(list(csv.DictReader(io.StringIO(significance_csv)))) == len(units)


def test_the_per_image_mode_runs_its_sweep_and_significance(platform: LocalStack) -> None:
    spec = _planted_spec(
        common_pb2.NetDissectParams(iou_mode="per_image"),
        common_pb2.ThresholdSweepParams(percentiles=[50.0, 80.0]),
    )
    with NeurodissectClient(platform.settings) as client:
        job = client.wait(client.submit(spec).id)
        assert job.state == common_pb2.SUCCEEDED, job.error
        units = {u.unit: u for u in client.units(job.id, "colors")}
    (summary,) = job.summary
    assert [p.threshold for p in summary.sweep] == [50.0, 80.0]
    assert summary.sweep[0].unchanged_fraction == 1.0
    for unit in planted_units():
        found = units[unit].netdissect
        assert found.top_concepts and found.top_concepts[0].label == found.label, unit
        assert units[unit].significance.label == found.label
    named = [units[u].netdissect.label == c for u, c in planted_units().items()]
    assert sum(named) >= len(named) - 1, [units[u].netdissect.label for u in planted_units()]
