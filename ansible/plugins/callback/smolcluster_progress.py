"""Print live training progress while train.yml waits for the run.

The trainer role's wait task polls the server's job status until the run ends;
Ansible only says "retrying" between polls. This callback prints the progress
line (step, loss, accuracy) that each poll returned.
"""

from __future__ import annotations

import json

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: smolcluster_progress
type: notification
short_description: show smolcluster training progress during train.yml's wait
description:
  - On each retry of the trainer role's "Wait for the run" task, prints the
    server's latest step, loss and accuracy.
requirements:
  - enabled through callbacks_enabled in ansible.cfg
"""

WAIT_TASK = "Wait for the run"


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "smolcluster_progress"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._last: str | None = None

    def v2_runner_retry(self, result) -> None:  # type: ignore[no-untyped-def]
        if WAIT_TASK not in result.task_name:
            return
        lines = result._result.get("stdout_lines") or []
        for line in lines[1:]:
            try:
                text = json.loads(line).get("line")
            except (ValueError, AttributeError):
                continue
            if text and text != self._last:
                self._last = text
                self._display.display(f"  [{result._host.get_name()}] {text}", color="cyan")
