"""`linear_rows`: a row's result must not depend on the batch it is computed in."""

import torch
import torch.nn.functional as F

from services.captioner.rowwise import ROW_BLOCK, linear_rows, lstm_cell


def test_a_row_gives_the_same_bits_alone_and_at_every_position_of_any_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 128, generator=generator)
    bias = torch.randn(300, generator=generator)
    row = torch.randn(1, 128, generator=generator)
    alone = linear_rows(row, weight, bias)
    for rows in (2, 7, ROW_BLOCK - 1, ROW_BLOCK, ROW_BLOCK + 3, 3 * ROW_BLOCK):
        batch = torch.randn(rows, 128, generator=generator)
        for position in {0, rows // 2, rows - 1}:
            batch[position] = row[0]
            assert torch.equal(linear_rows(batch, weight, bias)[position], alone[0])


def test_linear_rows_is_linear() -> None:
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(130, 32, generator=generator), torch.randn(10, 32, generator=generator)
    assert torch.allclose(linear_rows(x, weight), F.linear(x, weight), atol=1e-5)
    assert linear_rows(x[:0], weight).shape == (0, 10)


def test_lstm_cell_matches_torch() -> None:
    generator = torch.Generator().manual_seed(2)
    cell = torch.nn.LSTMCell(8, 16)
    x, h, c = (torch.randn(5, n, generator=generator) for n in (8, 16, 16))
    gates = F.linear(x, cell.weight_ih, cell.bias_ih) + F.linear(h, cell.weight_hh, cell.bias_hh)
    want_h, want_c = cell(x, (h, c))
    got_h, got_c = lstm_cell(gates, c)
    assert torch.allclose(got_h, want_h, atol=1e-6) and torch.allclose(got_c, want_c, atol=1e-6)
