"""Row-wise building blocks for search-time computation (beam search, PMI rescoring).

A hypothesis's numbers must not depend on which other hypotheses share a call, so
that decoding many units as one batch gives exactly what decoding each unit alone
gives. Element-wise ops and row-wise reductions have that property. BLAS matrix
products pick their kernels, blocking and thread split by the matrix shape, and
which shapes switch kernels differs from one CPU to another (a padding to "enough
rows" tuned on one CPU failed on another). `linear_rows` therefore calls the product
only on blocks of exactly `ROW_BLOCK` rows (the last one zero-padded): every call has
one shape whatever the batch, so a row's result is the same function of that row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ROW_BLOCK = 64


def linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` for x (N, in) -> (N, out), on blocks of `ROW_BLOCK` rows."""
    rows = x.shape[0]
    padding = -rows % ROW_BLOCK
    if padding:
        x = torch.cat([x, x.new_zeros(padding, x.shape[1])])
    blocks = [F.linear(block, weight, bias) for block in x.split(ROW_BLOCK)]
    return torch.cat(blocks)[:rows]


def lstm_cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """LSTM cell update from pre-activation gates (N, 4H), ordered i, f, g, o, and c (N, H).

    Returns the new (h, c), as `torch.nn.LSTMCell` computes them.
    """
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.addcmul(f.sigmoid() * c, i.sigmoid(), g.tanh())
    return o.sigmoid().mul_(c.tanh()), c
