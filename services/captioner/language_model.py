"""The caption prior p(d): a 2-layer LSTM language model over descriptions alone.

It shares the decoder's vocabulary (checked wherever the two meet) and scores a
description as Σ_t log p(w_t | start, w_<t) over its tokens through the first stop
token; whatever follows that stop (padding, more stops) is not counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    def score(self, tokens: Tensor, batch_size: int = 2048) -> Tensor:
        """The log-probability log p(d) of each description.

        tokens: (N, T) int64 without the start token, e.g. `w1 w2 stop pad …`.
        Returns (N,) float: summed log-probabilities of the counted positions
        (see `counted`), computed `batch_size` descriptions at a time.
        """
        if tokens.shape[1] == 0:
            return torch.zeros(tokens.shape[0], device=tokens.device)
        counted = self.counted(tokens)
        # Nothing after a row's last counted position affects its score, so rows are
        # batched by that length and each batch is cut to its longest row.
        positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
        lengths = (counted * positions).amax(dim=1)
        order = lengths.argsort(descending=True)
        start = torch.full_like(tokens[:, :1], self.vocabulary.start)
        inputs = torch.cat([start, tokens[:, :-1]], dim=1)
        scores = torch.zeros(tokens.shape[0], device=tokens.device)
        for rows in order.split(batch_size):
            length = int(lengths[rows[0]])
            if length == 0:
                break
            log_probs = self(inputs[rows, :length])
            picked = log_probs.gather(2, tokens[rows, :length, None]).squeeze(2)
            scores[rows] = torch.where(counted[rows, :length], picked, 0.0).sum(dim=1)
        return scores
