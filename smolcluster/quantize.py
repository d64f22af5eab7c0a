"""8-bit transport encoding: int8 values with one float32 scale per block of BLOCK values.

Layout of an encoded buffer of n values: ceil(n / BLOCK) float32 scales, then n int8 values.
Per-block scales keep one large gradient from flattening a whole layer to zero; the size is
0.25 + 1/BLOCK of fp32 (0.2510 with BLOCK = 1024).
"""

from __future__ import annotations

import torch

BLOCK = 1024


def encoded_nbytes(n: int) -> int:
    return _blocks(n) * 4 + n


def encode(values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize a flat float32 tensor into a uint8 buffer (scales, then int8 codes)."""
    n = values.numel()
    blocks = _blocks(n)
    buffer = out if out is not None else torch.empty(encoded_nbytes(n), dtype=torch.uint8)
    padded = torch.nn.functional.pad(values, (0, blocks * BLOCK - n)).view(blocks, BLOCK)
    scales = padded.abs().amax(dim=1) / 127.0
    scales[scales == 0] = 1.0
    codes = torch.round(padded / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    buffer[: blocks * 4].view(torch.float32).copy_(scales)
    buffer[blocks * 4 :].view(torch.int8).copy_(codes.view(-1)[:n])
    return buffer


def decode(buffer: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of encode: a flat float32 tensor of n values."""
    blocks = _blocks(n)
    if buffer.numel() != encoded_nbytes(n):
        raise ValueError(f"int8 buffer of {buffer.numel()} bytes, expected {encoded_nbytes(n)}")
    scales = buffer[: blocks * 4].view(torch.float32)
    codes = buffer[blocks * 4 :].view(torch.int8).to(torch.float32)
    codes = torch.nn.functional.pad(codes, (0, blocks * BLOCK - n)).view(blocks, BLOCK)
    result = (codes * scales[:, None]).view(-1)[:n]
    if out is None:
        return result
    return out.copy_(result)


def _blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK
