"""The caption model p(d|E): a Show-Attend-Tell LSTM decoder over a unit's exemplars.

E is a unit's (k, D) exemplar matrix. The LSTM state starts at
h0 = tanh(W_h · mean_i E_i), c0 = tanh(W_c · mean_i E_i). At each step additive
attention over the k exemplar vectors gives weights α (k,) from the previous hidden
state; the context Σ_i α_i E_i is scaled by a sigmoid gate σ(W_β h); the LSTM cell
reads [word embedding; gated context]; the next-word distribution is
log_softmax(W_o · dropout(h)).

Shapes use U for units and S for hypotheses (beam slots) per unit: all step tensors
are laid out (U, S, ...) so the k exemplars of a unit are shared by its S slots
instead of being copied S times.

Beam search evaluates the same step in pieces (`search_tables`, `state_gates`,
`expand`): everything a step computes from the previous hidden state (attention,
gate, context, the LSTM's context and recurrent terms) depends on the hypothesis's
parent only, so it is computed once per distinct parent state (`state_gates`, flat
(N, ...) tensors); the word-embedding term is a per-token table shared by all units;
only the cell update and the output layer run per hypothesis (`expand`). These
search-time pieces are row-wise (see `rowwise.py`): a hypothesis's numbers do not
depend on which other hypotheses or units share the call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.captioner.rowwise import linear_rows
from services.captioner.vocabulary import Vocabulary

# Hypotheses per chunk of `CaptionDecoder.expand`.
EXPAND_CHUNK = 256


class AttentionMemory(NamedTuple):
    """What attention reads, computed once per unit."""

    features: Tensor  # (U, k, D) exemplar vectors
    keys: Tensor  # (U, k, A) their projection into the attention space


class LSTMState(NamedTuple):
    """Decoder LSTM state, h and c each (U, S, H) in `step`, (N, H) in search."""

    h: Tensor
    c: Tensor


class SearchTables(NamedTuple):
    """Per-call constants of beam search (`CaptionDecoder.search_tables`).

    Search evaluates tanh as 2σ(2x) − 1, the same function (σ is about three times
    cheaper than tanh on CPU), with the doublings folded into weights, which is exact
    in binary floating point. Attention scores drop the bias and the −Σw that the
    rewrite adds: softmax over the exemplars does not change when every score of a
    hypothesis moves by the same constant.
    """

    features: Tensor  # (U, k, D) exemplar vectors
    keys: Tensor  # (U, k, A): 2·(W_f E + b_f)
    initial: LSTMState  # h0, c0, (U, H) each
    hidden_weight: Tensor  # (A + D, H): [2·W_q; W_β], the projections of h
    hidden_bias: Tensor  # (A + D,): [2·b_q; b_β]
    score_weight: Tensor  # (A,): 2·w, the attention score vector
    recurrent_weight: Tensor  # (4H, D + H): [W_ih[:, E:] | W_hh], cell-input rows doubled
    token_gates: Tensor  # (V, 4H): W_ih[:, :E]·embedding(v) + b_ih + b_hh, same doubling

    def select(self, units: slice) -> SearchTables:
        """The tables of `units` only (the per-unit fields sliced, the rest shared)."""
        h, c = self.initial
        return self._replace(
            features=self.features[units],
            keys=self.keys[units],
            initial=LSTMState(h[units], c[units]),
        )


class CaptionDecoder(nn.Module):
    """Show-Attend-Tell decoder giving log p(next token | prefix, E)."""

    def __init__(
        self,
        vocabulary: Vocabulary,
        feature_dim: int,
        embedding_dim: int = 128,
        hidden_dim: int = 512,
        attention_dim: int = 512,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self.feature_dim = feature_dim
        self.embedding_dim = embedding_dim
        self.hidden_dim = hidden_dim
        self.attention_dim = attention_dim
        self.dropout_p = dropout
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.feature_to_attention = nn.Linear(feature_dim, attention_dim)
        self.hidden_to_attention = nn.Linear(hidden_dim, attention_dim)
        self.attention_score = nn.Linear(attention_dim, 1)
        self.context_gate = nn.Linear(hidden_dim, feature_dim)
        self.embedding = nn.Embedding(len(vocabulary), embedding_dim, padding_idx=vocabulary.pad)
        self.lstm = nn.LSTMCell(embedding_dim + feature_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, len(vocabulary))

    def config(self) -> dict[str, int | float]:
        """Constructor arguments other than the vocabulary (for checkpoints)."""
        return {
            "feature_dim": self.feature_dim,
            "embedding_dim": self.embedding_dim,
            "hidden_dim": self.hidden_dim,
            "attention_dim": self.attention_dim,
            "dropout": self.dropout_p,
        }

    def memory(self, features: Tensor) -> AttentionMemory:
        """Attention memory of exemplar matrices `features` (U, k, D)."""
        return AttentionMemory(features, self.feature_to_attention(features))

    def initial_state(self, features: Tensor) -> LSTMState:
        """h0, c0 = tanh(W · mean of the k vectors); features (U, k, D) → (U, 1, H) each."""
        mean = features.mean(dim=1, keepdim=True)
        return LSTMState(torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)))

    def attend(self, memory: AttentionMemory, h: Tensor) -> tuple[Tensor, Tensor]:
        """Additive attention from hidden states h (U, S, H) over each unit's k exemplars.

        Returns the gated context (U, S, D) and the weights α (U, S, k), which sum to 1
        over k.
        """
        query = self.hidden_to_attention(h)  # (U, S, A)
        energy = (memory.keys.unsqueeze(1) + query.unsqueeze(2)).tanh_()  # (U, S, k, A)
        alpha = self.attention_score(energy).squeeze(-1).softmax(dim=-1)  # (U, S, k)
        context = torch.bmm(alpha, memory.features)  # (U, S, D)
        return torch.sigmoid(self.context_gate(h)) * context, alpha

    def step(
        self, memory: AttentionMemory, tokens: Tensor, state: LSTMState
    ) -> tuple[Tensor, LSTMState, Tensor]:
        """Advance every hypothesis by one token.

        memory: of U units; tokens: (U, S) int64, the previous token of each
        hypothesis; state: (U, S, H). Returns log-probabilities of the next token
        (U, S, V), the new state and the attention weights (U, S, k).
        """
        units, slots = tokens.shape
        context, alpha = self.attend(memory, state.h)
        inputs = torch.cat([self.embedding(tokens), context], dim=-1)
        h, c = self.lstm(
            inputs.view(units * slots, -1),
            (state.h.reshape(units * slots, -1), state.c.reshape(units * slots, -1)),
        )
        log_probs = F.log_softmax(self.output(self.dropout(h)), dim=-1)
        new_state = LSTMState(h.view(units, slots, -1), c.view(units, slots, -1))
        return log_probs.view(units, slots, -1), new_state, alpha

    def search_tables(self, features: Tensor) -> SearchTables:
        """Per-call constants of beam search over exemplar matrices `features` (U, k, D)."""
        units, k, dim = features.shape
        hidden = self.hidden_dim
        attention = self.feature_to_attention
        keys = linear_rows(
            features.reshape(units * k, dim), attention.weight * 2, attention.bias * 2
        )
        mean = features.mean(dim=1)
        initial = LSTMState(
            linear_rows(mean, self.init_h.weight, self.init_h.bias).tanh_(),
            linear_rows(mean, self.init_c.weight, self.init_c.bias).tanh_(),
        )
        query, gate = self.hidden_to_attention, self.context_gate
        lstm = self.lstm
        assert lstm.bias_ih is not None and lstm.bias_hh is not None
        embedding_dim = self.embedding_dim
        recurrent = torch.cat([lstm.weight_ih[:, embedding_dim:], lstm.weight_hh], dim=1)
        token_gates = linear_rows(
            self.embedding.weight, lstm.weight_ih[:, :embedding_dim], lstm.bias_ih + lstm.bias_hh
        )
        cell_input = slice(2 * hidden, 3 * hidden)  # gate order i, f, g, o
        recurrent[cell_input] *= 2
        token_gates[:, cell_input] *= 2
        return SearchTables(
            features=features,
            keys=keys.view(units, k, -1),
            initial=initial,
            hidden_weight=torch.cat([query.weight * 2, gate.weight]),
            hidden_bias=torch.cat([query.bias * 2, gate.bias]),
            score_weight=self.attention_score.weight[0] * 2,
            recurrent_weight=recurrent,
            token_gates=token_gates,
        )

    def state_gates(
        self, tables: SearchTables, units: Tensor, h: Tensor, chunk: int = 32
    ) -> Tensor:
        """The LSTM gate terms that depend on the previous hidden state only.

        h: (N, H) distinct hidden states, state i belonging to unit `units[i]` (int64
        (N,)) of `tables`. Returns (N, 4H): W_ih[:, E:]·(gated context) + W_hh·h with
        the gated context of `attend`, cell-input rows doubled (see `SearchTables`).
        Add `SearchTables.token_gates[token]` to get a step's gates for `search_cell`.
        Row-wise: a state's result does not depend on the other rows.
        """
        projected = linear_rows(h, tables.hidden_weight, tables.hidden_bias)
        query = projected[:, : self.attention_dim]  # doubled
        gate = projected[:, self.attention_dim :].sigmoid_()
        context = torch.empty(h.shape[0], self.feature_dim, dtype=h.dtype, device=h.device)
        # Attention energies are (states, k, A): on CPU done `chunk` states at a time
        # so the intermediate stays in cache instead of streaming through memory.
        if h.device.type != "cpu":
            chunk = max(h.shape[0], 1)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            energy = tables.keys.index_select(0, units[rows])  # (n, k, A)
            energy.add_(query[rows, None]).sigmoid_()  # (tanh(x) + 1) / 2
            # a row-wise reduction, not a matrix-vector product: see rowwise.py
            alpha = energy.mul_(tables.score_weight).sum(dim=-1).softmax(dim=-1)
            torch.bmm(
                alpha[:, None],
                tables.features.index_select(0, units[rows]),
                out=context[rows, None],
            )
        inputs = torch.cat([context.mul_(gate), h], dim=1)
        return linear_rows(inputs, tables.recurrent_weight)

    @staticmethod
    def search_cell(gates: Tensor, c: Tensor) -> LSTMState:
        """LSTM cell update from gates (N, 4H) as `state_gates` lays them out, and c (N, H).

        Overwrites `gates`. The same (h, c) as `nn.LSTMCell`, with tanh as 2σ(2x) − 1.
        """
        gates.sigmoid_()
        i, f, g, o = gates.chunk(4, dim=1)
        g.mul_(2).sub_(1)  # tanh of the cell input, whose pre-activation was doubled
        c = torch.addcmul(f * c, i, g)
        h = torch.sigmoid(c * 2).mul_(2).sub_(1).mul_(o)
        return LSTMState(h, c)

    def expand(
        self,
        tables: SearchTables,
        node_gates: Tensor,
        node_c: Tensor,
        nodes: Tensor,
        tokens: Tensor,
        chunk: int = EXPAND_CHUNK,
    ) -> tuple[LSTMState, Tensor]:
        """One step of L hypotheses, each continuing from a node with its last token.

        node_gates: (N, 4H) from `state_gates`; node_c: (N, H) the nodes' cells;
        nodes, tokens: (L,) int64. Returns the new state, h and c (L, H), and
        log p(next token) (L, V). On CPU done `chunk` hypotheses at a time so that the
        gate tensors stay in cache.
        """
        count = nodes.shape[0]
        if node_c.device.type != "cpu":
            chunk = max(count, 1)
        h = node_c.new_empty(count, self.hidden_dim)
        c = node_c.new_empty(count, self.hidden_dim)
        log_probs = node_c.new_empty(count, len(self.vocabulary))
        for start in range(0, count, chunk):
            rows = slice(start, start + chunk)
            # (index_select: row gathers through advanced indexing are several times slower)
            gates = node_gates.index_select(0, nodes[rows])
            gates.add_(tables.token_gates.index_select(0, tokens[rows]))
            h[rows], c[rows] = self.search_cell(gates, node_c.index_select(0, nodes[rows]))
            log_probs[rows] = self.next_log_probs(h[rows])
        return LSTMState(h, c), log_probs

    def next_log_probs(self, h: Tensor) -> Tensor:
        """Next-token log-probabilities (N, V) from hidden states h (N, H), without dropout."""
        logits = linear_rows(h, self.output.weight, self.output.bias)
        return F.log_softmax(logits, dim=-1)

    def forward(self, features: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass.

        features: (N, k, D); inputs: (N, T) int64, start token then the description's
        tokens. Returns log-probabilities of each next token (N, T, V) and attention
        weights (N, T, k).
        """
        memory = self.memory(features)
        state = self.initial_state(features)
        log_probs, alphas = [], []
        for t in range(inputs.shape[1]):
            step_log_probs, state, alpha = self.step(memory, inputs[:, t : t + 1], state)
            log_probs.append(step_log_probs)
            alphas.append(alpha)
        return torch.cat(log_probs, dim=1), torch.cat(alphas, dim=1)
