"""`python -m benchmarks.plaintext <smolcluster args>`: the smolcluster CLI with encryption
off, for benchmarks/encryption.py's on/off comparison only (the protocol has no off switch, on
purpose: nobody should train in the clear by a config typo).

Before running the CLI in this process it swaps every AEAD class protocol.py may seal with
(whichever cipher the handshake names) for NullAEAD: the same calls, the same 16-byte tag
(zeroed), so frame sizes, buffers and every other code path stay the trainer's own; only the
cipher pass becomes a copy. A peer that
really encrypts fails on the first sealed frame either way (neither side's tags verify), so
the server and every worker of an "off" run start here.
"""

from __future__ import annotations

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
    """The AEAD interface (AESGCM's, ChaCha20Poly1305's) as protocol.py uses it, copying bytes
    through."""

    def __init__(self, key: bytes) -> None:
        if len(key) != protocol.KEY_LEN:
            raise ValueError(f"a {protocol.KEY_LEN}-byte key, not {len(key)}")

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
    """From now on this process seals nothing, with either cipher: protocol.py looks the class
    up in AEADS at each construction."""
    for name in protocol.AEADS:
        protocol.AEADS[name] = NullAEAD


def main(argv: list[str] | None = None) -> int:
    install()
    from smolcluster.cli import main as smolcluster_main

    return smolcluster_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
