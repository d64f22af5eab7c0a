"""int8 transport encoding: size, round-trip error bound, error feedback."""

from __future__ import annotations

import torch

from smolcluster import quantize


def test_round_trip_error_is_within_half_a_step_per_block() -> None:
    torch.manual_seed(0)
    values = torch.randn(339_210) * torch.logspace(-4, 1, 339_210)  # scales vary a lot
    decoded = quantize.decode(quantize.encode(values), values.numel())
    blocks = quantize._blocks(values.numel())
    padded = torch.nn.functional.pad(values, (0, blocks * quantize.BLOCK - values.numel()))
    step = padded.view(blocks, -1).abs().amax(dim=1) / 127
    bound = step.repeat_interleave(quantize.BLOCK)[: values.numel()] / 2
    assert ((decoded - values).abs() <= bound * (1 + 1e-5) + 1e-12).all()


def test_encoded_size_is_about_a_quarter() -> None:
    n = 339_210
    assert quantize.encode(torch.randn(n)).numel() == quantize.encoded_nbytes(n)
    assert quantize.encoded_nbytes(n) / (4 * n) <= 0.26


def test_zeros_and_odd_lengths() -> None:
    for n in (1, 1023, 1025, 5000):
        values = torch.zeros(n)
        values[n // 2] = 3.0
        decoded = quantize.decode(quantize.encode(values), n)
        assert decoded.shape == (n,)
        assert decoded[n // 2] == 3.0
        assert decoded.abs().sum() == 3.0


def test_error_feedback_carries_what_was_dropped() -> None:
    torch.manual_seed(1)
    feedback = quantize.ErrorFeedback(4096)
    values = torch.randn(4096) * 1e-3
    values[0] = 10.0  # dwarfs the rest of its block: alone, they would round to zero
    sent_total = torch.zeros(4096)
    for _ in range(200):
        _, sent = feedback.encode(values)
        sent_total += sent
    # Over many messages the sum of what was sent tracks the sum of what was meant.
    assert (sent_total - 200 * values).abs().max() < 10.0 / 127
