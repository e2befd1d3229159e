"""Row-wise building blocks for search-time computation (beam search, PMI rescoring).

A hypothesis's numbers must not depend on which other hypotheses share a call, so
that decoding many units as one batch gives exactly what decoding each unit alone
gives. Element-wise ops and row-wise reductions have that property; BLAS matrix
products do too once they see enough rows, but with very few rows they switch to
matrix-vector kernels that round differently. `linear_rows` therefore pads its
input to at least `MIN_ROWS` rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_ROWS = 8


def linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` for x (N, in), computed on at least `MIN_ROWS` rows."""
    rows = x.shape[0]
    if rows >= MIN_ROWS:
        return F.linear(x, weight, bias)
    padded = torch.cat([x, x.new_zeros(MIN_ROWS - rows, x.shape[1])])
    return F.linear(padded, weight, bias)[:rows]


def lstm_cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """LSTM cell update from pre-activation gates (N, 4H), ordered i, f, g, o, and c (N, H).

    Returns the new (h, c), as `torch.nn.LSTMCell` computes them.
    """
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.addcmul(f.sigmoid() * c, i.sigmoid(), g.tanh())
    return o.sigmoid().mul_(c.tanh()), c
