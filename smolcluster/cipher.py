"""Which AEAD a cluster seals with: `cipher: auto` resolved from this CPU's AES instructions.

The server decides for the whole cluster (the average is sealed once for every worker) and
names its choice in the handshake. AES-256-GCM is the faster of the two only with AES
instructions (AES-NI, ARMv8 AES); without them ChaCha20-Poly1305 is faster and constant-time.
The parsers take the text the system prints, so they are tested on it; `machine_has_aes` is
the thin live read.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Literal, get_args

Cipher = Literal["aes-256-gcm", "chacha20-poly1305"]
CIPHERS: tuple[str, ...] = get_args(Cipher)
AES, CHACHA = CIPHERS
AUTO = "auto"


def cpuinfo_has_aes(text: str) -> bool:
    """Linux /proc/cpuinfo: `aes` in a "flags" (x86) or "Features" (arm64) line."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features") and "aes" in value.split():
            return True
    return False


def sysctl_has_aes(feat_aes: str, cpu_features: str) -> bool:
    """macOS: `sysctl -n hw.optional.arm.FEAT_AES` (Apple silicon) is 1, or `AES` is in
    `sysctl -n machdep.cpu.features` (Intel); either may be empty where the key is unknown."""
    return feat_aes.strip() == "1" or "AES" in cpu_features.upper().split()


def _sysctl(key: str) -> str:
    try:
        done = subprocess.run(
            ["sysctl", "-n", key], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def machine_has_aes() -> bool:
    """This machine's answer; False where it cannot tell (then ChaCha20-Poly1305 is safe)."""
    if platform.system() == "Darwin":
        return sysctl_has_aes(_sysctl("hw.optional.arm.FEAT_AES"), _sysctl("machdep.cpu.features"))
    try:
        return cpuinfo_has_aes(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def server_cipher(configured: str) -> str:
    """The cipher a server with this `cipher` key seals its cluster with."""
    if configured != AUTO:
        return configured
    return AES if machine_has_aes() else CHACHA
