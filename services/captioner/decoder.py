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
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.captioner.vocabulary import Vocabulary


class AttentionMemory(NamedTuple):
    """What attention reads, computed once per unit."""

    features: Tensor  # (U, k, D) exemplar vectors
    keys: Tensor  # (U, k, A) their projection into the attention space

    def select(self, units: Tensor) -> AttentionMemory:
        """The memory of `units` (int64 (U',)) only."""
        return AttentionMemory(self.features[units], self.keys[units])


class LSTMState(NamedTuple):
    """Decoder LSTM state, h and c each (U, S, H)."""

    h: Tensor
    c: Tensor


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
