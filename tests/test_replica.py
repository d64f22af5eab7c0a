"""The flat-buffer replica: learning-rate schedule and optimizer step."""

from __future__ import annotations

import math

import pytest
import torch

from smolcluster.config import ModelConfig
from smolcluster.replica import Replica, scheduled_lr


def test_cosine_starts_at_the_base_rate_and_ends_at_zero() -> None:
    assert scheduled_lr(0.01, "cosine", 0.0) == pytest.approx(0.01)
    assert scheduled_lr(0.01, "cosine", 0.5) == pytest.approx(0.005)
    assert scheduled_lr(0.01, "cosine", 1.0) == pytest.approx(0.0, abs=1e-12)
    assert scheduled_lr(0.01, "cosine", 0.25) == pytest.approx(0.005 * (1 + math.cos(math.pi / 4)))
    assert scheduled_lr(0.01, "constant", 0.9) == 0.01
    with pytest.raises(ValueError, match="lr_schedule"):
        scheduled_lr(0.01, "linear", 0.5)


def _stepped(schedule: str, progress: float) -> float:
    """How far one Adam step at `progress` moves the weights."""
    replica = Replica.build(ModelConfig(), 0.01, seed=1, schedule=schedule)
    before = replica.params.clone()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 784, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    replica.compute_gradients(x, y)
    replica.step(progress)
    return float((replica.params - before).abs().max())


def test_the_optimizer_step_follows_the_schedule() -> None:
    # Adam's first step moves each weight by about lr, whatever the gradient's scale.
    assert _stepped("cosine", 0.0) == pytest.approx(0.01, rel=0.01)
    assert _stepped("cosine", 0.5) == pytest.approx(0.005, rel=0.01)
    assert _stepped("cosine", 1.0) == 0.0
    assert _stepped("constant", 1.0) == pytest.approx(0.01, rel=0.01)


@pytest.mark.parametrize("fused", [True, False])
def test_the_replica_step_is_adam(fused: bool) -> None:
    """The replica's Adam follows torch's reference Adam (per-operation kernels) over steps
    whose learning rate moves (exactly when not fused), and loading its state buffer
    continues it bit for bit."""
    replica = Replica.build(ModelConfig(), 0.01, seed=1, schedule="cosine", fused=fused)
    reference = torch.nn.Parameter(replica.params.clone())
    adam = torch.optim.Adam([reference], lr=0.01, foreach=False, fused=False)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        x, y = torch.rand(16, 784, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        replica.compute_gradients(x, y)
        reference.grad = replica.grads.clone()
        adam.param_groups[0]["lr"] = scheduled_lr(0.01, "cosine", step / 10)
        replica.step(step / 10)
        adam.step()
        if fused:
            assert torch.allclose(replica.params, reference.detach(), rtol=0, atol=1e-6)
        else:
            assert torch.equal(replica.params, reference.detach())
    assert bool(replica.optimizer.defaults["fused"]) == fused
    twin = Replica.build(ModelConfig(), 0.01, seed=2, schedule="cosine", fused=fused)
    twin.load_state_buffer(replica.state_buffer(), replica.optimizer_step)
    for r in (replica, twin):
        r.grads.copy_(reference.grad)
        r.step(0.5)
    assert torch.equal(replica.params, twin.params)
