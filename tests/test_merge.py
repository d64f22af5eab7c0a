"""The merge and averaging math as pure functions: elastic's weights, staleness damping and
outer momentum step, sync's sample-weighted average and cover deal. The end-to-end tests
(test_sync.py, test_fault_tolerance.py) check the same rules through real processes."""

from __future__ import annotations

import pytest
import torch

from smolcluster.elastic import merge_weight, outer_step, push_counts, staleness_damping
from smolcluster.protocol import ProtocolError
from smolcluster.replica import weighted_mean_into
from smolcluster.sync import deal_cover, grads_counts


def test_staleness_damping_is_one_when_fresh_and_falls_with_age() -> None:
    assert staleness_damping(0, 0.5) == 1.0
    assert staleness_damping(3, 0.5) == pytest.approx(0.5)
    assert staleness_damping(3, 0.0) == 1.0  # exponent 0: age does not matter
    assert staleness_damping(8, 1.0) == pytest.approx(1 / 9)


def test_merge_weight_splits_a_full_fresh_push_among_the_active() -> None:
    full = 4 * 32  # K = 4 local steps of batch 32
    assert merge_weight(0, full, 4, 32, 1, 0.5) == 1.0
    assert merge_weight(0, full, 4, 32, 4, 0.5) == pytest.approx(0.25)
    assert merge_weight(0, full // 2, 4, 32, 1, 0.5) == pytest.approx(0.5)  # half the samples
    assert merge_weight(0, 10 * full, 4, 32, 1, 0.5) == 1.0  # more samples never count more
    assert merge_weight(3, full, 4, 32, 2, 0.5) == pytest.approx(0.25)  # damped and shared
    assert merge_weight(0, full, 4, 32, 0, 0.5) == 1.0  # nobody active: no division by zero


def test_outer_step_without_momentum_is_plain_sgd() -> None:
    params = torch.tensor([1.0, 2.0, 3.0])
    delta = torch.tensor([0.5, -1.0, 2.0])
    momentum = torch.zeros(3)
    outer_step(params, delta, momentum, weight=0.5, lr=0.1, mu=0.0)
    assert torch.allclose(
        params, torch.tensor([1.0, 2.0, 3.0]) - 0.1 * 0.5 * torch.tensor([0.5, -1.0, 2.0])
    )
    assert torch.equal(momentum, torch.zeros(3))  # untouched at mu = 0


def test_outer_step_with_momentum_is_nesterov_over_pushes() -> None:
    mu, lr = 0.9, 0.7
    params, momentum = torch.tensor([1.0, -1.0]), torch.zeros(2)
    pushes = [(torch.tensor([1.0, 2.0]), 0.5), (torch.tensor([-3.0, 0.5]), 0.25)]
    w, m = params.clone(), momentum.clone()
    for delta, weight in pushes:
        g = weight * delta
        m = mu * m + g
        w = w - lr * (g + mu * m)
        outer_step(params, delta.clone(), momentum, weight, lr, mu)
    assert torch.allclose(params, w) and torch.allclose(momentum, m)


def test_a_round_of_fresh_pushes_moves_the_weights_by_their_average() -> None:
    """A workers each pushing a full, fresh delta: with server_lr 1 and no momentum, w moves by
    the mean delta, as synchronous model averaging would."""
    params, momentum = torch.zeros(3), torch.zeros(3)
    deltas = [torch.tensor([3.0, 0.0, 6.0]), torch.tensor([0.0, 3.0, -3.0]), torch.ones(3)]
    for delta in deltas:
        outer_step(params, delta.clone(), momentum, merge_weight(0, 128, 4, 32, 3, 0.5), 1.0, 0.0)
    assert torch.allclose(params, -torch.stack(deltas).mean(dim=0))


def test_weighted_mean_weights_by_samples() -> None:
    out = torch.empty(2)
    parts = [(1, torch.tensor([4.0, 0.0])), (3, torch.tensor([0.0, 4.0]))]
    assert weighted_mean_into(out, parts) == 4
    assert torch.equal(out, torch.tensor([1.0, 3.0]))


def test_weighted_mean_sums_in_the_order_given() -> None:
    """float32 addition is not associative: the order of the parts is the result's order, which
    is what keeps a sync run bit-identical to the one-process baseline."""
    big, one = torch.tensor([1e8]), torch.tensor([1.0])
    out = torch.empty(1)
    weighted_mean_into(out, [(1, big), (1, -big), (1, one)])
    assert out.item() == pytest.approx(1 / 3)
    weighted_mean_into(out, [(1, big), (1, one), (1, -big)])
    assert out.item() == 0.0  # 1e8 + 1 rounds back to 1e8 in float32


def test_absent_ranks_are_dealt_round_robin_to_the_present() -> None:
    assert deal_cover([1, 2, 3], 3) == {}
    assert deal_cover([1, 3], 4) == {1: [2], 3: [4]}
    assert deal_cover([2], 4) == {2: [1, 3, 4]}
    assert deal_cover([1, 2], 5) == {1: [3, 5], 2: [4]}
    assert deal_cover([], 3) == {}


def test_a_push_counts_only_with_integer_counts_and_a_number_loss() -> None:
    good = {"base_version": 3, "samples": 128, "steps": 4, "loss": 0.5}
    assert push_counts(good, 5) == (3, 128, 4)
    bad = [
        {"base_version": True},  # JSON true is not a version
        {"samples": True},
        {"steps": False},
        {"loss": True},
        {"loss": "0.5"},
        {"base_version": 6},  # from the future
        {"samples": 0},
    ]
    for change in bad:
        with pytest.raises(ProtocolError):
            push_counts({**good, **change}, 5)


def test_gradients_count_only_with_an_integer_step_and_count_and_a_number_loss() -> None:
    good = {"step": 1, "samples": 32, "loss": 2.25}
    assert grads_counts(good, 1) == (32, 2.25)
    bad = [
        {"samples": True},  # JSON true is not one sample
        {"step": True},  # nor step 1
        {"loss": False},
        {"loss": "2.25"},
        {"step": 2},
        {"samples": 0},
        {"samples": 32.0},
    ]
    for change in bad:
        with pytest.raises(ProtocolError):
            grads_counts({**good, **change}, 1)
