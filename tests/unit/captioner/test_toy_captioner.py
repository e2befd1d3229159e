"""The toy captioner: trained on the toy world's annotations, it names held-out units' concepts.

Known answer: every toy annotation unit detects one colour, shape or texture
(`concepts.csv`). On the validation units (never trained on) the PMI caption
(λ = 0.2) must name the unit's concept for at least 70% of units, and name it at
least as often as the top beam (λ = 0): PMI must be at least as specific.
The checkpoint ships with the toy world (`services/toyworld/weights`); the recorded
held-out figures must be what it gives here, within a margin for another CPU's rounding.
"""

import time
from pathlib import Path

import pytest

from services.captioner.backbones import load_captioner
from services.captioner.milannotations import load_milannotations
from services.captioner.toy_captioner import (
    ToyRecipe,
    concept_figures,
    toy_annotations,
    toy_captioner,
    toy_captioner_metrics,
)

CACHE = Path(__file__).resolve().parents[3] / "var" / "cache"


@pytest.mark.slow
def test_toy_captioner_names_the_concepts_of_held_out_units() -> None:
    path = toy_captioner(CACHE)
    started = time.perf_counter()
    assert toy_captioner(CACHE) == path  # cached: the second call costs nothing
    assert time.perf_counter() - started < 10

    recipe = ToyRecipe()
    annotations = toy_annotations(CACHE, recipe)
    data = load_milannotations(annotations)
    _, held_out = data.split(recipe.validation_fraction, recipe.seed)
    with (annotations / "concepts.csv").open() as f:
        rows = [line.strip().split(",") for line in f.readlines()[1:]]
    concepts = {(layer, int(unit)): label for layer, unit, label in rows}
    assert {concepts[(u.layer, u.unit)] for u in held_out} > {"red", "circle"}

    captioner = load_captioner(path)
    pmi = concept_figures(captioner, data, held_out, concepts, pmi_lambda=0.2)
    greedy = concept_figures(captioner, data, held_out, concepts, pmi_lambda=0.0)
    print(f"\nheld-out units: PMI {pmi}\n                greedy {greedy}")
    assert pmi.concept_accuracy >= 0.7
    assert pmi.concept_accuracy >= greedy.concept_accuracy

    record = toy_captioner_metrics(CACHE)
    assert abs(record["held_out"]["pmi"]["concept_accuracy"] - pmi.concept_accuracy) <= 0.03
    assert abs(record["held_out"]["greedy"]["concept_accuracy"] - greedy.concept_accuracy) <= 0.03
    report = record["report"]
    assert report["val_units"] == len(held_out) and report["backbone"]["architecture"] == "toynet"
