"""Batched MILAN decoding vs decoding one unit at a time.

Both sides run the same public `decode_units` (beam 50, at most 15 tokens, PMI rerank
with λ = 0.2) with the same random-weight decoder and language model (spec sizes:
embedding 128, hidden 512, attention 512) on 15 exemplars per unit, each a 512-dim
vector as a small backbone's stages give. "ours" decodes all 256 units in one call;
the baseline calls it once per unit, as a user captioning units one by one would,
on a few of the units, and its rate is extrapolated. Random weights rarely emit the
stop token, so nearly every beam runs all 15 steps: the worst case for both sides.

Both sides use the same torch thread count, set explicitly and printed. The main
record uses one thread and process CPU time, which other processes on the machine
barely disturb; the second uses two threads and wall time (CPU time would count
both threads' waiting), so it moves with the machine's load. Each side is timed
REPEATS times, the two sides interleaved, and its fastest run counts.

Where batching pays: per unit both sides do nearly the same arithmetic, but one
unit's step is a handful of rows through ~15 MB of weights (LSTM, attention, output
layer, then the language model), so unit-at-a-time decoding streams the weights
from memory at every step, while the batch multiplies thousands of rows per pass
at the matrix-multiply peak. The language model's rescoring also shares prefixes
across units (p(d) does not depend on the unit), which only the batch can exploit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from services.captioner.decoder import CaptionDecoder
from services.captioner.decoding import CaptionResult, decode_units
from services.captioner.language_model import LanguageModel
from services.captioner.vocabulary import Vocabulary

UNITS = 256
BASELINE_UNITS = 8
EXEMPLARS = 15
FEATURE_DIM = 512
VOCABULARY_WORDS = 500
BEAM_SIZE = 50
MAX_TOKENS = 15
TARGET = 5.0
REPEATS = 3

T = TypeVar("T")


def _models() -> tuple[CaptionDecoder, LanguageModel]:
    vocabulary = Vocabulary.build(f"w{i}" for i in range(VOCABULARY_WORDS))
    torch.manual_seed(0)
    return CaptionDecoder(vocabulary, FEATURE_DIM).eval(), LanguageModel(vocabulary).eval()


def _timed(run: Callable[[], T]) -> tuple[T, float, float]:
    """run(), its process CPU seconds and its wall seconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = run()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def _measure(threads: int, clock: str) -> dict[str, object]:
    decoder, language_model = _models()
    features = torch.randn(
        UNITS, EXEMPLARS, FEATURE_DIM, generator=torch.Generator().manual_seed(1)
    )
    torch.set_num_threads(threads)
    # warm-up: first calls pay for allocator growth and kernel selection
    decode_units(decoder, language_model, features[:2], BEAM_SIZE, MAX_TOKENS)
    decode_units(decoder, language_model, features[2:3], BEAM_SIZE, MAX_TOKENS)

    def all_at_once() -> list[CaptionResult]:
        return decode_units(decoder, language_model, features, BEAM_SIZE, MAX_TOKENS)

    def one_at_a_time() -> list[CaptionResult]:
        return [
            decode_units(decoder, language_model, features[u : u + 1], BEAM_SIZE, MAX_TOKENS)[0]
            for u in range(BASELINE_UNITS)
        ]

    batched_cpu = batched_wall = single_cpu = single_wall = float("inf")
    for _ in range(REPEATS):
        batched, cpu, wall = _timed(all_at_once)
        batched_cpu, batched_wall = min(batched_cpu, cpu), min(batched_wall, wall)
        single, cpu, wall = _timed(one_at_a_time)
        single_cpu, single_wall = min(single_cpu, cpu), min(single_wall, wall)

    use_cpu = clock == "cpu"
    ours = UNITS / (batched_cpu if use_cpu else batched_wall)
    baseline = BASELINE_UNITS / (single_cpu if use_cpu else single_wall)
    # captions, their tokens and both log-probabilities, compared exactly
    same = batched[:BASELINE_UNITS] == single
    other = (
        f"wall-clock: {UNITS / batched_wall:.3g} vs {BASELINE_UNITS / single_wall:.3g}"
        if use_cpu
        else f"process CPU time: {UNITS / batched_cpu:.3g} vs {BASELINE_UNITS / single_cpu:.3g}"
    )
    name = "caption_decode" if threads == 1 else f"caption_decode_{threads}threads"
    return {
        "name": name,
        "ours": ours,
        "baseline": baseline,
        "unit": "units/s",
        "ratio": ours / baseline,
        "target": TARGET,
        "notes": (
            f"torch threads = {threads} on both sides; units/s by "
            f"{'process CPU time' if use_cpu else 'wall-clock time'} (by {other} units/s). "
            f"{UNITS} units in one decode_units call vs one unit per call (rate measured "
            f"on {BASELINE_UNITS} units and extrapolated), best of {REPEATS} interleaved "
            f"runs each; beam {BEAM_SIZE}, {MAX_TOKENS} "
            f"tokens, {EXEMPLARS} exemplars × {FEATURE_DIM} dims, {VOCABULARY_WORDS + 4} "
            f"tokens, random weights, CPU; identical results (captions, tokens, both "
            f"log-probabilities) on the {BASELINE_UNITS} units: {same}"
        ),
    }


def run() -> list[dict[str, object]]:
    threads = torch.get_num_threads()
    try:
        return [_measure(1, "cpu"), _measure(2, "wall")]
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    for record in run():
        print(json.dumps(record, indent=2))
