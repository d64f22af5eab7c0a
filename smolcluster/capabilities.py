"""What this host's trainer can do, for the settings every host of a run must share.

The trainer role asks each host before it renders the configs (`trainer_cipher: auto`,
`trainer_fused_adam: auto`) and writes the one answer all of them can follow:

    python -m smolcluster.capabilities    # {"cipher": "aes-256-gcm", "fused_adam": true}

Read without importing torch (seconds on a Pi, for every host on every run): the fused CPU
Adam came with torch 2.4, the version the trainer's own refusal names (replica.adam).
"""

from __future__ import annotations

import json
import re
from importlib import metadata

from smolcluster.cipher import AUTO, server_cipher

FUSED_ADAM_SINCE = (2, 4)


def torch_has_fused_adam(version: str) -> bool:
    """torch `version` (2.2.2, 2.14.1+cu130, 2.5.0a0+git...) has a fused Adam for the CPU."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return bool(found) and (int(found[1]), int(found[2])) >= FUSED_ADAM_SINCE


def capabilities() -> dict[str, object]:
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = ""
    return {"cipher": server_cipher(AUTO), "fused_adam": torch_has_fused_adam(torch)}


if __name__ == "__main__":
    print(json.dumps(capabilities()))
