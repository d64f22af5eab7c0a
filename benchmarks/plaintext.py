"""`python -m benchmarks.plaintext <smolcluster args>`: the smolcluster CLI with encryption
off, for benchmarks/encryption.py's on/off comparison only (protocol 3 has no off switch, on
purpose: nobody should train in the clear by a config typo).

Before running the CLI in this process it swaps the AEAD class protocol.py seals with for
NullAEAD: the same calls, the same 16-byte tag (zeroed), so frame sizes, buffers and every
other code path stay the trainer's own; only the cipher pass becomes a copy. A peer that
really encrypts fails on the first sealed frame either way (neither side's tags verify), so
the server and every worker of an "off" run start here.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag

from smolcluster import protocol

ZERO_TAG = bytes(protocol.SEAL_TAG)


def _bytes(data: bytes | bytearray | memoryview) -> memoryview:
    return memoryview(data).cast("B")


def _opened(data: bytes | bytearray | memoryview) -> memoryview:
    """The plaintext before a sealed part's tag, which must be the null tag."""
    view = _bytes(data)
    if len(view) < protocol.SEAL_TAG or view[-protocol.SEAL_TAG :] != ZERO_TAG:
        raise InvalidTag
    return view[: -protocol.SEAL_TAG]


class NullAEAD:
    """ChaCha20Poly1305's interface as protocol.py uses it, copying bytes through."""

    def __init__(self, key: bytes) -> None:
        if len(key) != protocol.KEY_LEN:
            raise ValueError(f"a {protocol.KEY_LEN}-byte key, not {len(key)}")

    @staticmethod
    def generate_key() -> bytes:
        return os.urandom(protocol.KEY_LEN)

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        return bytes(data) + ZERO_TAG

    def encrypt_into(self, nonce: bytes, data: bytes, aad: bytes | None, buf: memoryview) -> int:
        body, out = _bytes(data), _bytes(buf)
        out[: len(body)] = body  # ValueError when buf is not len(data) + tag, as the real one
        out[len(body) :] = ZERO_TAG
        return len(out)

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        return bytes(_opened(data))

    def decrypt_into(self, nonce: bytes, data: bytes, aad: bytes | None, buf: memoryview) -> int:
        plain = _opened(data)
        _bytes(buf)[:] = plain
        return len(plain)


def install() -> None:
    """From now on this process seals nothing: protocol.py looks the class up at each use."""
    protocol.ChaCha20Poly1305 = NullAEAD  # type: ignore[misc, assignment]


def main(argv: list[str] | None = None) -> int:
    install()
    from smolcluster.cli import main as smolcluster_main

    return smolcluster_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
