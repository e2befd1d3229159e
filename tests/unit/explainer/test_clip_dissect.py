from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch
from neurodissect.v1 import common_pb2

from services.common.errors import InvalidArgument
from services.common.result_store import message_row
from services.common.spec_vocabulary import SIMILARITIES
from services.explainer import clip_dissect
from services.explainer.clip_dissect import (
    SOFT_WPMI,
    WPMI,
    WpmiParams,
    _leave_one_out_logsumexp,
    clip_similarity,
    describe_units,
    layer_ranking,
    layer_similarity,
    prepare_concepts,
    top_indices,
    unit_rows,
)
from services.explainer.methods.clip_dissect import ClipDissect, descriptions_csv, result_message


def similarity_of(method: str, activations: np.ndarray, s: np.ndarray, block: int) -> np.ndarray:
    """The layer's (U, C) similarity through the two-step block API."""
    prepared = prepare_concepts(method, s)
    n_units = activations.shape[1]
    rows = [
        unit_rows(method, activations[:, u0 : u0 + block], prepared)
        for u0 in range(0, n_units, block)
    ]
    return layer_similarity(method, np.concatenate(rows))


def planted(
    n_images: int = 600, n_concepts: int = 40, n_units: int = 12, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S from random concept presence, units each driven by one planted concept.

    Returns S (N, C), activations (N, U) and the planted concept of each unit (U,).
    """
    rng = np.random.default_rng(seed)
    present = rng.random((n_images, n_concepts)) < 0.15
    s = 0.2 + 0.1 * present + 0.01 * rng.standard_normal((n_images, n_concepts))
    concept_of_unit = rng.choice(n_concepts, size=n_units, replace=False)
    activations = present[:, concept_of_unit] + 0.3 * rng.standard_normal((n_images, n_units))
    return s.astype(np.float32), activations.astype(np.float32), concept_of_unit


# --- similarity ----------------------------------------------------------------------


def test_clip_similarity_has_no_logit_scale() -> None:
    s = clip_similarity(np.array([[3.0, 0.0]]), np.array([[1.0, 1.0], [0.0, -2.0]]))
    np.testing.assert_allclose(s, [[math.sqrt(0.5), 0.0]], atol=1e-7)


# --- labels -----------------------------------------------------------------------


@pytest.mark.parametrize("method", SIMILARITIES)
def test_every_planted_unit_is_named(method: str) -> None:
    s, activations, concept_of_unit = planted()
    sim = similarity_of(method, activations, s, block=5)
    names = [f"c{m}" for m in range(s.shape[1])]
    described = describe_units(sim, names)
    assert [d.label for d in described] == [f"c{m}" for m in concept_of_unit]


# 83 concepts: rows that are no whole number of SIMD widths, where torch's exp and log give
# the last elements of a flat tensor another rounding
@pytest.mark.parametrize("n_concepts", [80, 83])
@pytest.mark.parametrize("step_elements", [None, 1 << 12])
@pytest.mark.parametrize("method", ["soft_wpmi", "wpmi"])
def test_labels_and_rows_do_not_depend_on_block_size(
    method: str, step_elements: int | None, n_concepts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if step_elements is not None:  # a few units per step: exercises steps inside a block
        monkeypatch.setattr(clip_dissect, "_STEP_ELEMENTS", step_elements)
    s, activations, _ = planted(n_images=300, n_concepts=n_concepts, n_units=64, seed=1)
    activations = activations + np.random.default_rng(2).standard_normal(activations.shape).astype(
        np.float32
    )
    prepared = prepare_concepts(method, s)
    results = []
    for block in (1, 7, 64):
        rows = np.concatenate(
            [
                unit_rows(method, activations[:, u0 : u0 + block], prepared)
                for u0 in range(0, 64, block)
            ]
        )
        results.append((rows, layer_similarity(method, rows).argmax(axis=1)))
    for rows, labels in results[1:]:
        np.testing.assert_array_equal(rows, results[0][0])
        np.testing.assert_array_equal(labels, results[0][1])


def test_marginal_is_over_the_whole_layer_not_the_block() -> None:
    s, activations, _ = planted(n_images=300, n_units=8, seed=3)
    prepared = prepare_concepts("soft_wpmi", s)
    rows = unit_rows("soft_wpmi", activations, prepared)
    whole = layer_similarity("soft_wpmi", rows)
    first_half = layer_similarity("soft_wpmi", rows[:4])
    assert not np.allclose(whole[:4], first_half)


def test_soft_wpmi_is_invariant_to_increasing_transforms() -> None:
    s, activations, _ = planted(n_images=400, n_units=16, seed=4)
    as64 = activations.astype(np.float64)
    for transformed in (np.exp(as64), as64**3 + 5 * as64, np.arctan(as64)):
        sim = similarity_of("soft_wpmi", transformed.astype(np.float32), s, block=16)
        np.testing.assert_array_equal(
            sim.argmax(axis=1), similarity_of("soft_wpmi", activations, s, block=16).argmax(axis=1)
        )
        prepared = prepare_concepts("soft_wpmi", s)
        np.testing.assert_array_equal(
            unit_rows("soft_wpmi", transformed.astype(np.float32), prepared),
            unit_rows("soft_wpmi", activations, prepared),
        )


@pytest.mark.parametrize(("method", "a"), [("soft_wpmi", 10.0), ("wpmi", 2.0)])
def test_wpmi_concept_matrix_is_the_softmax_whatever_the_chunk(
    method: str, a: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, _, _ = planted(n_images=200, n_concepts=50, seed=5)  # 50: no whole number of SIMD widths
    expected = torch.softmax(a * torch.from_numpy(s).double(), dim=1).numpy()
    prepared = prepare_concepts(method, s)
    assert prepared.shape == s.shape and prepared.dtype == np.float32
    np.testing.assert_allclose(prepared, expected, rtol=2e-6)
    monkeypatch.setattr(clip_dissect, "_STEP_ELEMENTS", 150)  # 3 rows per chunk
    np.testing.assert_array_equal(prepare_concepts(method, s), prepared)


def test_overwrite_writes_the_concept_matrix_over_s_only_when_asked() -> None:
    s, activations, _ = planted(n_images=200, n_units=6, seed=6)
    original = s.copy()
    prepared = prepare_concepts("soft_wpmi", s)
    np.testing.assert_array_equal(s, original)
    from_float64 = prepare_concepts("soft_wpmi", original.astype(np.float64), overwrite=True)
    np.testing.assert_array_equal(from_float64, prepared)
    in_place = prepare_concepts("soft_wpmi", s, overwrite=True)
    assert in_place is s
    np.testing.assert_array_equal(in_place, prepared)
    np.testing.assert_array_equal(
        unit_rows("soft_wpmi", activations, in_place), unit_rows("soft_wpmi", activations, prepared)
    )


@pytest.mark.parametrize(
    "params",
    [SOFT_WPMI, WPMI, WpmiParams(top_k=300, a=10.0, lam=1.0, p_start=0.999, p_end=0.01)],
)
def test_factor_groups_cover_every_position_and_keep_products_in_float32(
    params: WpmiParams,
) -> None:
    offsets, _ = params.factor_offsets(params.top_k)
    groups = clip_dissect._factor_groups(offsets)
    assert [j for j0, j1 in groups for j in range(j0, j1)] == list(range(params.top_k))
    d = offsets.astype(np.float64)
    for j0, j1 in groups:
        low, high = np.prod(d[j0:j1]), np.prod(1 + d[j0:j1])  # every P̃ 0, every P̃ 1
        assert 1e3 * np.finfo(np.float32).tiny < low and high < 1e-3 * np.finfo(np.float32).max
        if j1 < params.top_k:  # as long as allowed: one more factor would leave e^±80
            assert low * d[j1] < math.exp(-80) or high * (1 + d[j1]) > math.exp(80)


# --- each similarity function against the formula, by hand ------------------------


def small_input(
    n_images: int = 150, n_concepts: int = 6, n_units: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    s = rng.uniform(-0.3, 0.5, size=(n_images, n_concepts)).astype(np.float32)
    activations = rng.standard_normal((n_images, n_units)).astype(np.float32)
    return s, activations


def wpmi_by_hand(s: np.ndarray, activations: np.ndarray, params: WpmiParams) -> list[list[float]]:
    n_images, n_concepts = s.shape
    n_units = activations.shape[1]
    kappa = min(params.top_k, n_images)
    probs = []
    for i in range(n_images):
        exps = [math.exp(params.a * float(s[i, m])) for m in range(n_concepts)]
        probs.append([e / sum(exps) for e in exps])
    big_l = []
    for k in range(n_units):
        ranked = sorted(range(n_images), key=lambda i: (-float(activations[i, k]), i))[:kappa]
        row = []
        for m in range(n_concepts):
            total = 0.0
            for j, x in enumerate(ranked):
                p_j = params.p_start - (j / kappa) * (params.p_start - params.p_end)
                total += math.log((1 - p_j) + p_j * probs[x][m] + params.min_prob)
            row.append(total)
        big_l.append(row)
    sim = []
    for k in range(n_units):
        row = []
        for m in range(n_concepts):
            column = [big_l[q][m] for q in range(n_units)]
            top = max(column)
            log_marginal = (
                top + math.log(sum(math.exp(v - top) for v in column)) - math.log(n_units)
            )
            row.append(big_l[k][m] - params.lam * log_marginal)
        sim.append(row)
    return sim


def cos_by_hand(s: np.ndarray, activations: np.ndarray, cubed: bool) -> list[list[float]]:
    def transform(column: list[float]) -> list[float]:
        if cubed:
            mean = sum(column) / len(column)
            column = [(v - mean) ** 3 for v in column]
            norm = max(math.sqrt(sum(v * v for v in column)), 1e-3)
        else:
            norm = math.sqrt(sum(v * v for v in column))
        return [v / norm for v in column]

    concept_columns = [transform([float(v) for v in s[:, m]]) for m in range(s.shape[1])]
    unit_columns = [
        transform([float(v) for v in activations[:, k]]) for k in range(activations.shape[1])
    ]
    return [
        [sum(a * b for a, b in zip(u, c, strict=True)) for c in concept_columns]
        for u in unit_columns
    ]


# the spec's constants, written out rather than taken from the module under test
SPEC_SOFT_WPMI = WpmiParams(top_k=100, a=10.0, lam=1.0, p_start=0.998, p_end=0.97, min_prob=1e-7)
SPEC_WPMI = WpmiParams(top_k=28, a=2.0, lam=0.6, p_start=1.0, p_end=1.0, min_prob=1e-7)


def test_module_parameters_are_the_spec_ones() -> None:
    assert (SOFT_WPMI, WPMI) == (SPEC_SOFT_WPMI, SPEC_WPMI)


@pytest.mark.parametrize(("method", "params"), [("soft_wpmi", SPEC_SOFT_WPMI), ("wpmi", SPEC_WPMI)])
def test_wpmi_functions_match_the_formula(method: str, params: WpmiParams) -> None:
    s, activations = small_input()
    expected = wpmi_by_hand(s, activations, params)
    np.testing.assert_allclose(
        similarity_of(method, activations, s, block=2), expected, rtol=2e-6, atol=2e-4
    )


def test_fewer_images_than_kappa_uses_every_image() -> None:
    s, activations = small_input(n_images=40, n_concepts=4, n_units=3)
    expected = wpmi_by_hand(s, activations, SPEC_SOFT_WPMI)
    np.testing.assert_allclose(
        similarity_of("soft_wpmi", activations, s, block=3), expected, atol=2e-4
    )


@pytest.mark.parametrize(("method", "cubed"), [("cos", False), ("cos_cubed", True)])
def test_cosine_functions_match_the_formula(method: str, cubed: bool) -> None:
    s, activations = small_input(n_images=30)
    expected = cos_by_hand(s, activations, cubed)
    np.testing.assert_allclose(
        similarity_of(method, activations, s, block=2), expected, rtol=1e-4, atol=1e-6
    )


def test_cos_of_a_dead_unit_is_zero_not_nan() -> None:
    s, activations = small_input(n_images=30)
    activations[:, 1] = 0.0
    sim = similarity_of("cos", activations, s, block=5)
    assert np.all(sim[1] == 0.0) and np.isfinite(sim).all()


# --- describing units --------------------------------------------------------------


def test_describe_units_gives_argmax_max_and_sorted_top_five() -> None:
    sim = np.array(
        [[0.1, 0.9, 0.3, 0.9, 0.5, 0.2, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0]],
        dtype=np.float32,
    )
    names = ["a", "b", "c", "d", "e", "f", "g"]
    first, second = describe_units(sim, names, first_unit=10)
    assert (first.unit, first.label, first.score) == (10, "b", pytest.approx(0.9))
    assert first.top_labels == ("b", "d", "e", "c", "f")
    assert second.top_labels == ("a", "b", "c", "d", "e")
    assert second.top_scores == (5.0, 4.0, 3.0, 2.0, 1.0)


def test_rank_orders_the_concepts_and_sim_gives_the_scores() -> None:
    sim = np.array([[1.0, 3.0, 3.0, 2.0]], dtype=np.float32)
    rank = np.array([[0.0, 1.0, 5.0, 2.0]], dtype=np.float32)
    (unit,) = describe_units(sim, list("abcd"), top=3, rank=rank)
    assert unit.top_labels == ("c", "d", "b")
    assert unit.top_scores == (3.0, 2.0, 3.0)


def test_a_saturated_soft_wpmi_label_is_the_most_specific_concept() -> None:
    # Concepts x and y are both far likelier on unit 0's top images than on the others':
    # sim reaches log 3 for both in float32, but y is the more specific (r 80 vs 45).
    rows = np.array(
        [[-50.0, -20.0, -5.0], [-95.0, -100.0, -5.0], [-400.0, -400.0, -6.0]], dtype=np.float32
    )
    sim = layer_similarity("soft_wpmi", rows)
    assert sim[0, 0] == pytest.approx(np.log(3), abs=1e-5)
    assert sim[0, 1] == pytest.approx(np.log(3), abs=1e-5)
    rank = layer_ranking("soft_wpmi", rows, sim)
    np.testing.assert_allclose(rank[0], [45.0, 80.0, -np.log1p(np.exp(-1.0))], atol=1e-4)
    np.testing.assert_array_equal(rank[1:], sim[1:])  # not saturated: ranked by sim
    assert describe_units(sim, ["x", "y", "z"], rank=rank)[0].label == "y"


def test_unsaturated_layers_and_other_functions_rank_by_similarity() -> None:
    rows = np.random.default_rng(0).normal(scale=3.0, size=(6, 40)).astype(np.float32)
    for method in ("soft_wpmi", "wpmi", "cos"):
        sim = layer_similarity(method, rows)
        assert layer_ranking(method, rows, sim) is sim


def test_leave_one_out_logsumexp_matches_the_direct_sum() -> None:
    x = np.random.default_rng(1).normal(scale=3.0, size=(5, 30))
    x[:, 0] = [-500.0, -1.0, -1.0, -700.0, -2.0]  # a tie at the maximum
    x[:, 1] = [0.0, -300.0, -400.0, -500.0, -600.0]  # one dominant unit
    found = _leave_one_out_logsumexp(x)
    for k in range(len(x)):
        others = np.delete(x, k, axis=0)
        top = others.max(axis=0)
        expected = top + np.log(np.exp(others - top).sum(axis=0))
        np.testing.assert_allclose(found[k], expected, rtol=1e-12, atol=1e-12)


def test_csv_export_has_the_reference_columns_and_quotes_commas() -> None:
    sim = np.array([[0.5, 2.0], [1.0, 0.0]], dtype=np.float32)
    described = describe_units(sim, ["dog", "cat, tabby"])
    rows = {d.unit: message_row(d.unit, result_message(d)) for d in reversed(described)}
    text = descriptions_csv("layer4", rows)
    assert list(csv.reader(io.StringIO(text))) == [
        ["layer", "unit", "description", "similarity"],
        ["layer4", "0", "cat, tabby", "2.000000"],
        ["layer4", "1", "dog", "1.000000"],
    ]


def test_top_indices_break_ties_towards_the_lower_index() -> None:
    values = np.array([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0]])
    np.testing.assert_array_equal(top_indices(values, 3), [[1, 2, 4]])
    np.testing.assert_array_equal(top_indices(values, 6), [[1, 2, 4, 5, 3, 0]])


# --- user errors ---------------------------------------------------------------------


def test_unknown_method_names_the_field_and_the_choices() -> None:
    with pytest.raises(InvalidArgument) as caught:
        prepare_concepts("softwpmi", np.zeros((3, 2), dtype=np.float32))
    assert caught.value.field == "similarity_function"
    assert "soft_wpmi" in str(caught.value)


def test_non_finite_activations_are_rejected() -> None:
    s, activations = small_input(n_images=30)
    activations[3, 0] = np.nan
    with pytest.raises(InvalidArgument):
        unit_rows("soft_wpmi", activations, s)


def test_mismatched_image_counts_are_rejected() -> None:
    s, activations = small_input(n_images=30)
    with pytest.raises(InvalidArgument):
        unit_rows("cos", activations[:20], prepare_concepts("cos", s))


def test_default_similarity_is_soft_wpmi() -> None:
    params = ClipDissect().params(common_pb2.DissectionSpec())
    assert (params.similarity, params.pooling) == ("soft_wpmi", "mean")


def test_cos_cubed_column_means_accumulate_in_float64() -> None:
    # columns with a large mean and a small spread: a float32 mean is ~7e-6 off after the cube
    rng = np.random.default_rng(7)
    x = (rng.random((3000, 500)) * 0.1 + 1.0).astype(np.float32)
    exact = x.astype(np.float64)
    cubed = (exact - exact.mean(axis=0)) ** 3
    expected = cubed / np.maximum(np.linalg.norm(cubed, axis=0), 1e-3)
    assert np.abs(clip_dissect._columns_cubed(x) - expected).max() < 1e-6


@pytest.mark.parametrize("chunk", [1, 7, 64, 300])
def test_top_images_streamed_in_chunks_are_the_top_indices_of_all_images(chunk: int) -> None:
    rng = np.random.default_rng(21)
    # few distinct values: many ties, which go to the lower image index
    activations = rng.integers(0, 6, (300, 9)).astype(np.float32)
    top = clip_dissect.TopImages("soft_wpmi")
    for i0 in range(0, 300, chunk):
        top.add(activations[i0 : i0 + chunk])
    expected = top_indices(np.ascontiguousarray(activations.T), 100)
    np.testing.assert_array_equal(top.indices(), expected)


def test_top_images_of_fewer_images_than_kappa_keep_them_all() -> None:
    activations = np.random.default_rng(22).standard_normal((30, 4)).astype(np.float32)
    top = clip_dissect.TopImages("wpmi")
    top.add(activations[:10])
    top.add(activations[10:])
    assert top.indices().shape == (4, 28)
    np.testing.assert_array_equal(
        top.indices(), top_indices(np.ascontiguousarray(activations.T), 28)
    )


@pytest.mark.parametrize("method", ["soft_wpmi", "wpmi"])
def test_wpmi_rows_by_concept_blocks_are_unit_rows_bit_for_bit(method: str) -> None:
    rng = np.random.default_rng(23)
    n_images, n_units, n_concepts = 400, 12, 1000
    similarity = rng.uniform(-0.4, 0.4, (n_images, n_concepts)).astype(np.float32)
    activations = rng.standard_normal((n_images, n_units)).astype(np.float32)
    prepared = clip_dissect.prepare_concepts(method, similarity)
    dense = clip_dissect.unit_rows(method, activations, prepared)
    top = clip_dissect.TopImages(method)
    for i0 in range(0, n_images, 128):
        top.add(activations[i0 : i0 + 128])
    blocks = [
        clip_dissect.wpmi_rows(method, top.indices(), prepared[:, m0 : m0 + 192])
        for m0 in range(0, n_concepts, 192)
    ]
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), dense)
