"""What tensors look like on the wire: one codec per run, chosen where the session is built.

A codec turns n float32 values into a payload and back and names itself in the frame's flags,
so a receiver refuses a payload in another encoding instead of misreading it. Every send and
receive of gradients, pushes and weights goes through the run's codec (`for_config`); START's
replica state is always `FP32`, because a joiner must hold the server's exact numbers. A new
encoding is one more subclass with `nbytes`, `encode` and `decode`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from smolcluster import quantize
from smolcluster.protocol import FLAG_INT8, Frame, ProtocolError


class Codec(ABC):
    name: str
    flags: int  # what the frame header says about the payload
    exact: bool  # decode(encode(x)) is x bit for bit

    @abstractmethod
    def nbytes(self, n: int) -> int:
        """The payload size of n values."""

    @abstractmethod
    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """The payload of a flat float32 tensor (call .numpy() to send it)."""

    @abstractmethod
    def decode(
        self, payload: torch.Tensor, n: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The n float32 values of a uint8 payload, written into `out` when given."""

    def read(self, frame: Frame, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The n values a frame carries, checked to be in this encoding and of its size."""
        if frame.flags != self.flags:
            raise ProtocolError(
                f"{frame.type.name} payload with flags {frame.flags}, this run sends {self.name}"
            )
        expected = self.nbytes(n)
        if frame.payload.nbytes != expected:
            raise ProtocolError(
                f"{frame.type.name} payload of {frame.payload.nbytes} bytes, expected {expected}"
            )
        return self.decode(torch.frombuffer(frame.payload, dtype=torch.uint8), n, out)

    def round_trip(self, values: torch.Tensor) -> torch.Tensor:
        """Encode `values` and set them to what every receiver will decode; returns the
        payload, so the sender holds the very numbers it sent."""
        encoded = self.encode(values)
        if not self.exact:
            self.decode(encoded, values.numel(), out=values)
        return encoded


class Fp32(Codec):
    """Raw float32, no copy either way: decode without `out` is a view of the payload."""

    name, flags, exact = "fp32", 0, True

    def nbytes(self, n: int) -> int:
        return 4 * n

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def decode(
        self, payload: torch.Tensor, n: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        values = payload.view(torch.float32)
        return values if out is None else out.copy_(values)


class Int8(Codec):
    """int8 blocks with one float32 scale each (smolcluster.quantize): about a quarter."""

    name, flags, exact = "int8", FLAG_INT8, False

    def nbytes(self, n: int) -> int:
        return quantize.encoded_nbytes(n)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        return quantize.encode(values)

    def decode(
        self, payload: torch.Tensor, n: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return quantize.decode(payload, n, out=out)


FP32, INT8 = Fp32(), Int8()


def for_config(use_quantization: bool) -> Codec:
    """The run's codec: int8 blocks with use_quantization, else fp32."""
    return INT8 if use_quantization else FP32


class ErrorFeedback:
    """Carries what a lossy codec dropped into the next message, so no update is lost for good."""

    def __init__(self, codec: Codec, n: int) -> None:
        self.codec = codec
        self.residual = torch.zeros(n, dtype=torch.float32)

    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (encoded payload, the values the receiver will decode)."""
        corrected = values + self.residual
        encoded = self.codec.encode(corrected)
        sent = self.codec.decode(encoded, values.numel())
        self.residual = corrected - sent
        return encoded, sent
