"""MILAN decoding: batched beam search under p(d|E), then PMI reranking with p(d).

Beam search keeps `beam_size` hypotheses per unit, scored by summed log p(d|E) (no
length normalisation), for at most `max_tokens` steps (a stop token counts as one).
A hypothesis that has emitted stop stays in the beam with its score frozen (it is
extended only by padding, at no cost), so the final beam holds finished and
unfinished hypotheses ranked together. Every final hypothesis is then rescored by

    log p(d|E) − λ · log p(d)

and the best one is the unit's caption; λ = 0 returns the top beam.

The beams of all units of a request advance together as one batch (in groups of
`UNIT_GROUP` units, for cache locality): each step runs the decoder once over the
distinct parent states of all live hypotheses (siblings share their parent's
attention and recurrent terms) and once per live hypothesis for the cell update and
the output layer. Units whose hypotheses have all finished drop out of the batch,
and finished hypotheses are carried along without running the decoder on them. The
language model scores all units' final hypotheses together, each distinct prefix
once (p(d) does not depend on the unit).

Decoding is deterministic given the weights, and every search-time computation is
row-wise, so a unit's caption and log-probabilities are exactly those it gets when
decoded alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.captioner.decoder import CaptionDecoder, SearchTables
from services.captioner.language_model import LanguageModel
from services.captioner.vocabulary import detokenize
from services.common.errors import InvalidArgument
from services.common.spec_vocabulary import MILAN_BEAM, MILAN_MAX_TOKENS, PMI_LAMBDA

DEFAULT_BEAM_SIZE = MILAN_BEAM.default
DEFAULT_MAX_TOKENS = MILAN_MAX_TOKENS.default
DEFAULT_PMI_LAMBDA = PMI_LAMBDA.default
# Units per beam-search batch: large enough for efficient matrix products (a step
# computes ~10 parent states per unit), small enough that a step's tensors stay in cache.
UNIT_GROUP = 48


@dataclass(frozen=True)
class CaptionResult:
    """One unit's caption and the two log-probabilities it was chosen by."""

    caption: str
    tokens: tuple[str, ...]  # the caption's tokens, without start and stop
    logp_caption: float  # log p(d|E), summed through the stop token if emitted
    logp_lm: float  # log p(d), same tokens


@dataclass(frozen=True)
class Beams:
    """Final beam of every unit.

    tokens: (U, B, T) int64, each hypothesis padded with pad after its stop token;
    logp: (U, B) float summed log p(d|E), sorted descending per unit; -inf marks an
    empty slot (possible only when the vocabulary has fewer tokens than the beam).
    """

    tokens: Tensor
    logp: Tensor


@contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Run `modules` in eval mode (no dropout) under inference mode; restore their modes."""
    modes = [module.training for module in modules]
    try:
        for module in modules:
            module.eval()
        with torch.inference_mode():
            yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


def check_decoding_parameters(beam_size: int, max_tokens: int, pmi_lambda: float) -> None:
    """Raise `InvalidArgument` naming the field when a decoding parameter is out of range."""
    if beam_size < 1:
        raise InvalidArgument(f"is {beam_size}; must be at least 1", field="beam")
    if max_tokens < 1:
        raise InvalidArgument(f"is {max_tokens}; must be at least 1", field="max_tokens")
    if not 0.0 <= pmi_lambda < float("inf"):
        raise InvalidArgument(f"is {pmi_lambda}; must be finite and ≥ 0", field="pmi_lambda")


def beam_search(
    decoder: CaptionDecoder,
    features: Tensor,
    beam_size: int = DEFAULT_BEAM_SIZE,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    group_size: int = UNIT_GROUP,
) -> Beams:
    """Beam search under log p(d|E) for all units at once.

    features: (U, k, D) exemplar matrices on the decoder's device. Call inside
    `evaluating(decoder)`. Start and pad are never generated.

    A step's work splits into what depends on a hypothesis's parent state only
    (attention over the exemplars, the LSTM's context and recurrent terms) and what
    depends on its last token too (the embedding term, the cell update, the output
    layer). Siblings share their parent's state, so the first part runs once per
    distinct parent ("node"), over all units' nodes at once; the embedding term is a
    per-token table computed once per call. Units advance `group_size` at a time
    (one group's step tensors stay in cache; a giant batch streams through memory);
    every computation is row-wise, so the result depends neither on the grouping nor
    on which other units share a call.
    """
    units = features.shape[0]
    tables = decoder.search_tables(features)
    groups = [
        _search_group(
            decoder, tables.select(slice(start, start + group_size)), beam_size, max_tokens
        )
        for start in range(0, max(units, 1), group_size)
    ]
    if len(groups) == 1:
        return groups[0]
    length = max(group.tokens.shape[2] for group in groups)
    pad = decoder.vocabulary.pad
    return Beams(
        torch.cat([F.pad(g.tokens, (0, length - g.tokens.shape[2]), value=pad) for g in groups]),
        torch.cat([group.logp for group in groups]),
    )


def _search_group(
    decoder: CaptionDecoder, tables: SearchTables, beam_size: int, max_tokens: int
) -> Beams:
    """`beam_search` over the units of `tables`, all advancing together."""
    vocabulary = decoder.vocabulary
    vocab_size = len(vocabulary)
    units, device = tables.features.shape[0], tables.features.device
    # Slot 0 holds the empty hypothesis; the other slots start empty, which is
    # encoded as finished with score -inf, so that they never grow nor win.
    logp = torch.full((units, beam_size), float("-inf"), device=device)
    logp[:, 0] = 0.0
    finished = torch.ones(units, beam_size, dtype=torch.bool, device=device)
    finished[:, 0] = False
    previous = torch.full((units, beam_size), vocabulary.start, device=device)
    tokens = torch.empty(units, beam_size, 0, dtype=torch.long, device=device)
    # Nodes: the distinct LSTM states (h, c) that live slots continue from, node i
    # belonging to unit node_unit[i]; node_of[u, s] is live slot s's node.
    h, c = tables.initial
    node_unit = torch.arange(units, device=device)
    node_of = torch.zeros(units, beam_size, dtype=torch.long, device=device)
    node_of[:, 0] = node_unit
    # A finished hypothesis's only continuation is padding, at no cost.
    frozen = torch.full((vocab_size,), float("-inf"), device=device)
    frozen[vocabulary.pad] = 0.0
    banned = torch.tensor([vocabulary.start, vocabulary.pad], device=device)
    pad_column = torch.full((units, beam_size, 1), vocabulary.pad, device=device)

    for _ in range(max_tokens):
        live = ~finished
        active = live.any(dim=1).nonzero()[:, 0]
        if active.numel() == 0:
            break
        tokens = torch.cat([tokens, pad_column], dim=2)
        live_active = live[active]
        # Slots past the last live one only hold finished hypotheses: carry them.
        grow = int(live_active.nonzero()[:, 1].max()) + 1
        rows, slots = live_active[:, :grow].nonzero().unbind(1)  # live slots, row-major
        slot_units = active[rows]
        nodes = node_of[slot_units, slots]
        node_gates = decoder.state_gates(tables, node_unit, h)
        state, slot_logp = decoder.expand(
            tables, node_gates, c, nodes, previous[slot_units, slots]
        )  # (L, H) each, (L, V)
        slot_logp[:, banned] = float("-inf")

        if rows.shape[0] == active.shape[0] * grow:  # no finished slot below `grow`
            step_logp = slot_logp.view(active.shape[0], grow, vocab_size)
        else:
            step_logp = frozen.expand(active.shape[0], grow, vocab_size).clone()
            step_logp.view(-1, vocab_size).index_copy_(0, rows * grow + slots, slot_logp)
        step_logp.add_(logp[active, :grow, None])
        candidates = step_logp.view(active.shape[0], grow * vocab_size)  # (U', grow·V)
        if grow < beam_size:  # carried finished hypotheses
            candidates = torch.cat([candidates, logp[active, grow:]], dim=1)
        top, index = candidates.topk(beam_size, dim=1)
        grown = index < grow * vocab_size
        source = torch.where(grown, index // vocab_size, index - grow * vocab_size + grow)
        token = torch.where(grown, index % vocab_size, vocabulary.pad)

        history = tokens[active, :, :-1]
        history = history.gather(1, source[:, :, None].expand(-1, -1, history.shape[2]))
        tokens[active] = torch.cat([history, token[:, :, None]], dim=2)
        # A slot left with -inf (fewer candidates than slots) is empty: finished for good.
        now_finished = (
            finished[active].gather(1, source) | (token == vocabulary.stop) | top.isneginf()
        )
        # The next nodes: the new states of the sources of the slots still live
        # (each a grown slot, so its source is a live slot of this step).
        slot_index = torch.full((active.shape[0], grow), -1, dtype=torch.long, device=device)
        slot_index[rows, slots] = torch.arange(rows.shape[0], device=device)
        still = ~now_finished
        sources = slot_index.gather(1, source.clamp(max=grow - 1))[still]
        distinct, inverse = torch.unique(sources, sorted=True, return_inverse=True)
        h, c = state.h.index_select(0, distinct), state.c.index_select(0, distinct)
        node_unit = slot_units[distinct]
        active_nodes = torch.zeros(active.shape[0], beam_size, dtype=torch.long, device=device)
        active_nodes[still] = inverse
        node_of[active] = active_nodes
        finished[active] = now_finished
        logp[active] = top
        previous[active] = token
    return Beams(tokens, logp)


def language_model_scores(language_model: LanguageModel, beams: Beams) -> Tensor:
    """The log p(d) of every hypothesis in `beams`: (U, B) float, 0 for empty slots."""
    occupied = torch.isfinite(beams.logp)
    scores = torch.zeros_like(beams.logp)
    scores[occupied] = language_model.score(beams.tokens[occupied])
    return scores


def rerank(logp_caption: Tensor, logp_lm: Tensor, pmi_lambda: float) -> Tensor:
    """Index of the best hypothesis per unit by log p(d|E) − λ·log p(d).

    logp_caption, logp_lm: (U, B) float. Returns (U,) int64; ties go to the lowest
    index, so with λ = 0 and a sorted beam the top beam wins.
    """
    return (logp_caption - pmi_lambda * logp_lm).argmax(dim=1)


def decode_units(
    decoder: CaptionDecoder,
    language_model: LanguageModel,
    features: Tensor,
    beam_size: int = DEFAULT_BEAM_SIZE,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    pmi_lambda: float = DEFAULT_PMI_LAMBDA,
) -> list[CaptionResult]:
    """One PMI-reranked caption per unit.

    features: (U, k, D) exemplar matrices on the models' device. Raises
    `VocabularyMismatch` when the two models do not share a vocabulary.
    """
    vocabulary = decoder.vocabulary
    vocabulary.require_same(language_model.vocabulary, "language_model.vocabulary")
    check_decoding_parameters(beam_size, max_tokens, pmi_lambda)
    with evaluating(decoder, language_model):
        beams = beam_search(decoder, features, beam_size, max_tokens)
        logp_lm = language_model_scores(language_model, beams)
        best = rerank(beams.logp, logp_lm, pmi_lambda)
    rows = torch.arange(features.shape[0], device=best.device)
    results = []
    for ids, logp_caption, logp_prior in zip(
        beams.tokens[rows, best].tolist(),
        beams.logp[rows, best].tolist(),
        logp_lm[rows, best].tolist(),
        strict=True,
    ):
        words = vocabulary.words(ids)
        results.append(CaptionResult(detokenize(words), tuple(words), logp_caption, logp_prior))
    return results
