"""Corpus BLEU (Papineni et al. 2002), the decoder's validation metric.

Clipped n-gram precisions for n = 1..4 are pooled over the corpus and combined by
geometric mean with a brevity penalty against the closest reference length (ties
to the shorter). An order with no match gets ε = 0.1 matches instead of zero
(Chen & Cherry 2014, method 1), so that short validation captions still rank.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

SMOOTHING_EPSILON = 0.1


def ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of the n-grams of `tokens`."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[Sequence[str]]],
    max_order: int = 4,
    epsilon: float = SMOOTHING_EPSILON,
) -> float:
    """Smoothed corpus BLEU-`max_order` in [0, 1].

    hypotheses: one token list per segment; references: for each segment, one or
    more token lists.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference sets")
    matches = [0] * max_order
    totals = [0] * max_order
    hyp_length = ref_length = 0
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        hyp_length += len(hypothesis)
        ref_length += min((len(r) for r in refs), key=lambda n: (abs(n - len(hypothesis)), n))
        for n in range(1, max_order + 1):
            counts = ngrams(hypothesis, n)
            best_ref: Counter[tuple[str, ...]] = Counter()
            for ref in refs:
                best_ref |= ngrams(ref, n)
            matches[n - 1] += sum(min(c, best_ref[g]) for g, c in counts.items())
            totals[n - 1] += sum(counts.values())
    if hyp_length == 0:
        return 0.0
    log_precision = sum(
        math.log((m if m > 0 else epsilon) / max(t, 1))
        for m, t in zip(matches, totals, strict=True)
    )
    brevity = 0.0 if hyp_length > ref_length else 1.0 - ref_length / hyp_length
    return math.exp(brevity + log_precision / max_order)
