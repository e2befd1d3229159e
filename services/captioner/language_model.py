"""The caption prior p(d): a 2-layer LSTM language model over descriptions alone.

It shares the decoder's vocabulary (checked wherever the two meet) and scores a
description as Σ_t log p(w_t | start, w_<t) over its tokens through the first stop
token; whatever follows that stop (padding, more stops) is not counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.captioner.rowwise import linear_rows, lstm_cell
from services.captioner.vocabulary import Vocabulary


class LanguageModel(nn.Module):
    """Word-level LSTM language model."""

    def __init__(
        self,
        vocabulary: Vocabulary,
        embedding_dim: int = 128,
        hidden_dim: int = 512,
        num_layers: int = 2,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self.embedding_dim = embedding_dim
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.dropout_p = dropout
        self.embedding = nn.Embedding(len(vocabulary), embedding_dim, padding_idx=vocabulary.pad)
        self.lstm = nn.LSTM(
            embedding_dim, hidden_dim, num_layers=num_layers, dropout=dropout, batch_first=True
        )
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, len(vocabulary))

    def config(self) -> dict[str, int | float]:
        """Constructor arguments other than the vocabulary (for checkpoints)."""
        return {
            "embedding_dim": self.embedding_dim,
            "hidden_dim": self.hidden_dim,
            "num_layers": self.num_layers,
            "dropout": self.dropout_p,
        }

    def forward(self, inputs: Tensor) -> Tensor:
        """Next-token log-probabilities (N, T, V) for inputs (N, T) int64 (start first)."""
        hidden, _ = self.lstm(self.embedding(inputs))
        return F.log_softmax(self.output(self.dropout(hidden)), dim=-1)

    def counted(self, tokens: Tensor) -> Tensor:
        """Which positions of `tokens` (N, T) count in log p(d): (N, T) bool.

        A position counts unless a stop token occurs before it or it is padding.
        """
        is_stop = tokens == self.vocabulary.stop
        stops_before = is_stop.cumsum(dim=1) - is_stop.long()
        return (stops_before == 0) & (tokens != self.vocabulary.pad)

    def step(self, tokens: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One step for N sequences, without dropout (eval-mode semantics).

        tokens: (N,) int64 inputs; h, c: (num_layers, N, H) states. Returns the
        next-token log-probabilities (N, V) and the new h, c. Row-wise: a sequence's
        numbers do not depend on the other rows of the call.
        """
        x = self.embedding(tokens)
        hs, cs = [], []
        for layer in range(self.num_layers):
            weight_ih = getattr(self.lstm, f"weight_ih_l{layer}")
            weight_hh = getattr(self.lstm, f"weight_hh_l{layer}")
            bias = getattr(self.lstm, f"bias_ih_l{layer}") + getattr(self.lstm, f"bias_hh_l{layer}")
            gates = linear_rows(x, weight_ih, bias).add_(linear_rows(h[layer], weight_hh))
            x, c_layer = lstm_cell(gates, c[layer])
            hs.append(x)
            cs.append(c_layer)
        logits = linear_rows(x, self.output.weight, self.output.bias)
        return F.log_softmax(logits, dim=-1), torch.stack(hs), torch.stack(cs)

    def score(self, tokens: Tensor, batch_size: int = 2048) -> Tensor:
        """The log-probability log p(d) of each description.

        tokens: (N, T) int64 without the start token, e.g. `w1 w2 stop pad …`.
        Returns (N,) float: summed log-probabilities of the counted positions
        (see `counted`), without dropout.

        Descriptions that share a prefix share its LSTM steps: position t is computed
        once per distinct prefix tokens[:, :t] among the rows that still count
        something at or after t (final beams share long prefixes, within a unit and
        across units). At most `batch_size` prefixes go through one LSTM call; the
        result does not depend on it nor on which other rows are scored alongside.
        """
        if tokens.shape[1] == 0:
            return torch.zeros(tokens.shape[0], device=tokens.device)
        rows_total, length = tokens.shape
        device = tokens.device
        counted = self.counted(tokens)
        positions = torch.arange(1, length + 1, device=device)
        lengths = (counted * positions).amax(dim=1)  # rows use positions < length
        dtype = self.output.weight.dtype
        picked = torch.zeros(rows_total, length, dtype=dtype, device=device)
        layers, hidden = self.num_layers, self.hidden_dim
        h = torch.zeros(layers, 1, hidden, dtype=dtype, device=device)
        c = torch.zeros_like(h)
        rows = (lengths > 0).nonzero()[:, 0]  # rows that need position t (t = 0 here)
        node = torch.zeros_like(rows)  # each row's prefix, as an index into h, c
        inputs = torch.full((1,), self.vocabulary.start, device=device)
        parents = torch.zeros(1, dtype=torch.long, device=device)
        vocab_size = len(self.vocabulary)
        for t in range(length):
            if t > 0:
                keep = lengths[rows] > t
                rows = rows[keep]
                # the distinct prefixes of length t: (parent prefix, its last token)
                key = node[keep] * vocab_size + tokens[rows, t - 1]
                distinct, node = torch.unique(key, sorted=True, return_inverse=True)
                parents, inputs = distinct // vocab_size, distinct % vocab_size
            if rows.numel() == 0:
                break
            log_probs = torch.empty(parents.shape[0], vocab_size, dtype=dtype, device=device)
            new_h = torch.empty(layers, parents.shape[0], hidden, dtype=dtype, device=device)
            new_c = torch.empty_like(new_h)
            for start in range(0, parents.shape[0], batch_size):
                part = slice(start, start + batch_size)
                log_probs[part], new_h[:, part], new_c[:, part] = self.step(
                    inputs[part], h.index_select(1, parents[part]), c.index_select(1, parents[part])
                )
            h, c = new_h, new_c
            picked[rows, t] = log_probs[node, tokens[rows, t]]
        return torch.where(counted, picked, 0.0).sum(dim=1)
