"""A model replica whose parameters, gradients and Adam state each live in one flat buffer.

One contiguous float32 buffer per quantity means a step's gradients go on the wire as a single
zero-copy payload, the averaged gradients are received straight into the gradient buffer, and
the whole optimizer state fits in three tensors for joiners and checkpoints.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from torch import nn

from smolcluster.model import build_model


def scheduled_lr(base: float, schedule: str, progress: float) -> float:
    """The learning rate at `progress` (0 at the start of the run, 1 at its end).

    cosine decays to 0 by the end: the final weights then settle instead of moving by a full
    step's noise, which is what makes two runs (or a run and its interrupted twin) comparable.
    """
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    raise ValueError(f"unknown lr_schedule {schedule!r}")


def weighted_mean_into(out: torch.Tensor, parts: list[tuple[int, torch.Tensor]]) -> int:
    """Set `out` to the sample-weighted mean of (samples, values) parts; returns the samples.

    Parts are summed in the order given (callers use rank order): float addition is not
    associative, and Adam's early, nearly sign-like steps turn last-bit differences into
    visible ones, so every replica and the baseline must round exactly alike.
    """
    total = sum(n for n, _ in parts)
    out.zero_()
    for n, values in parts:
        out.add_(values, alpha=n)
    out.div_(total)
    return total


def adam(params: list[nn.Parameter], lr: float, fused: bool) -> torch.optim.Adam:
    """Adam on CPU, fused (one kernel) or per operation; a torch without a fused CPU Adam
    (before 2.4, as on Intel Macs) is refused with the setting to change."""
    if not fused:
        return torch.optim.Adam(params, lr=lr, foreach=False)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        raise ValueError(
            f"nn.fused_adam: torch {torch.__version__} on this host has no fused Adam for the "
            "CPU (torch >= 2.4); set fused_adam: false in the nn config of every host"
        ) from None


class Replica:
    def __init__(
        self, model: nn.Module, lr: float, schedule: str = "constant", fused: bool = True
    ) -> None:
        self.model = model
        self.base_lr, self.schedule = lr, schedule
        params = [p for p in model.parameters() if p.requires_grad]
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in params)
        self.params = torch.zeros(self.numel, dtype=torch.float32)
        self.grads = torch.zeros(self.numel, dtype=torch.float32)
        self.slices: list[tuple[int, int]] = []
        offset = 0
        for p in params:
            n = p.numel()
            self.params[offset : offset + n].copy_(p.detach().reshape(-1))
            p.data = self.params[offset : offset + n].view_as(p)
            p.grad = self.grads[offset : offset + n].view_as(p)
            self.slices.append((offset, offset + n))
            offset += n
        # The optimizer steps one flat tensor that shares storage with every module parameter.
        # fused: one pass over the buffers instead of one per Adam operation (0.66 ms against
        # 1.86 ms per step on 339,210 parameters, one thread). The two kernels round
        # differently, so every replica and the baseline must use the same (nn.fused_adam).
        self.flat = nn.Parameter(self.params, requires_grad=True)
        self.flat.grad = self.grads
        self.optimizer = adam([self.flat], lr, fused)
        state = self.optimizer.state[self.flat]
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(self.params)
        state["exp_avg_sq"] = torch.zeros_like(self.params)

    @classmethod
    def build(
        cls, model_cfg, lr: float, seed: int, schedule: str = "constant", fused: bool = True
    ) -> Replica:
        model = build_model(
            model_cfg.type, model_cfg.input_dim, model_cfg.hidden, model_cfg.out, seed
        )
        return cls(model, lr, schedule, fused)

    @property
    def nbytes(self) -> int:
        return self.numel * 4

    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward and backward on one batch; gradients land in self.grads. Returns the loss."""
        self.grads.zero_()
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        return float(loss.detach())

    def step(self, progress: float = 0.0) -> None:
        """Apply self.grads (local, or an average written into it) with Adam, at the learning
        rate the schedule gives for `progress` (0..1 through the run)."""
        lr = scheduled_lr(self.base_lr, self.schedule, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()

    # -- state that must be identical on every replica ------------------------------------------
    @property
    def optimizer_step(self) -> int:
        return int(self.optimizer.state[self.flat]["step"].item())

    def state_tensors(self) -> list[torch.Tensor]:
        state = self.optimizer.state[self.flat]
        return [self.params, state["exp_avg"], state["exp_avg_sq"]]

    def state_buffer(self) -> torch.Tensor:
        return torch.cat(self.state_tensors())

    def load_state_buffer(self, buffer: torch.Tensor, optimizer_step: int) -> None:
        for target, chunk in zip(self.state_tensors(), buffer.split(self.numel), strict=True):
            target.copy_(chunk)
        self.optimizer.state[self.flat]["step"].fill_(float(optimizer_step))

    def checksum(self) -> str:
        """Digest of the exact parameter bytes: replicas in lockstep are bit-identical."""
        return hashlib.sha256(self.params.numpy().tobytes()).hexdigest()[:16]

    def average_into_grads(self, parts: list[tuple[int, torch.Tensor]]) -> int:
        """Set self.grads to the sample-weighted mean of (samples, gradients) parts."""
        return weighted_mean_into(self.grads, parts)

    def save(self, path: Path) -> None:
        """The trained weights as a plain state_dict (torch.load(..., weights_only=True))."""
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), path)

    def grad_norms(self) -> dict[str, float]:
        return {
            name: float(self.grads[a:b].norm())
            for name, (a, b) in zip(self.names, self.slices, strict=True)
        }
