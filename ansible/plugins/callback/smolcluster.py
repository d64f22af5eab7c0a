"""Ansible's default output, with three changes that make a smolcluster run readable.

1. While train.yml waits for the run, each poll prints the server's progress line (step/total,
   epoch, loss, accuracy, samples/s, slowest worker, ETA) instead of "FAILED - RETRYING".
2. A failed role argument check prints one line per mistake, `role <name>: <var>=<value>: must
   be ...`, once for the whole run, instead of the spec as JSON once per host.
3. A failed check task (assert/fail) prints its message only, each line once.
"""

from __future__ import annotations

import json
from typing import Any

from ansible import constants as C
from ansible.plugins.callback.default import CallbackModule as DefaultCallback

DOCUMENTATION = """
name: smolcluster
type: stdout
short_description: default output, with training progress and one-line check failures
description:
  - The default stdout callback; train.yml's wait polls show progress instead of retries,
    argument-spec and assert failures show one line per mistake, once.
extends_documentation_fragment:
  - default_callback
  - result_format_callback
requirements:
  - set as stdout_callback in ansible.cfg
"""

PROGRESS_TASK = "Wait for the run"
QUIET_RETRY_TASKS = ("Wait for the workers to finish", "Wait for the server port")
CHECK_ACTIONS = {"assert", "fail", "ansible.builtin.assert", "ansible.builtin.fail"}
SPEC_ACTIONS = {"validate_argument_spec", "ansible.builtin.validate_argument_spec"}
TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "list": "a list",
    "dict": "a mapping",
    "path": "a path",
}


class CallbackModule(DefaultCallback):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "smolcluster"

    def __init__(self) -> None:
        super().__init__()
        self._last_progress: str | None = None
        self._said: set[str] = set()

    def v2_playbook_on_play_start(self, play: Any) -> None:
        self._current_play = play
        super().v2_playbook_on_play_start(play)

    def v2_runner_retry(self, result: Any) -> None:
        name = result.task_name or ""
        if PROGRESS_TASK in name:
            for line in (result.result.get("stdout_lines") or [])[1:]:
                try:
                    text = json.loads(line).get("line")
                except (ValueError, AttributeError):
                    continue
                if text and text != self._last_progress:
                    if self._last_task_banner != result.task._uuid:
                        self._print_task_banner(result.task)
                    self._last_progress = text
                    self._display.display(f"  [{result.host.get_name()}] {text}", color="cyan")
            return
        if any(quiet in name for quiet in QUIET_RETRY_TASKS):
            return
        super().v2_runner_retry(result)

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        action = result.task.action
        if ignore_errors or action not in SPEC_ACTIONS | CHECK_ACTIONS:
            super().v2_runner_on_failed(result, ignore_errors)
        elif not (result.task.loop and "results" in result.result):  # items were shown
            self._one_line_each(result)

    def v2_runner_item_on_failed(self, result: Any) -> None:
        if result.task.action in SPEC_ACTIONS | CHECK_ACTIONS:
            self._one_line_each(result)
        else:
            super().v2_runner_item_on_failed(result)

    def v2_runner_item_on_ok(self, result: Any) -> None:
        if result.task.action not in SPEC_ACTIONS:  # a role whose arguments are fine: no news
            super().v2_runner_item_on_ok(result)

    def _one_line_each(self, result: Any) -> None:
        action = result.task.action
        if action in SPEC_ACTIONS:
            lines = self._spec_lines(result)
        else:
            lines = [ln for ln in str(result.result.get("msg", "")).splitlines() if ln.strip()]
        fresh = [line for line in lines if line not in self._said]
        if not fresh:
            return
        if self._last_task_banner != result.task._uuid:
            self._print_task_banner(result.task)
        for line in fresh:
            self._said.add(line)
            self._display.display(f"ERROR: {line}", color=C.COLOR_ERROR, stderr=False)

    def _spec_lines(self, result: Any) -> list[str]:
        data = result.result
        spec = data.get("argument_spec_data") or {}
        context = data.get("validate_args_context") or {}
        where = f"role {context.get('name') or data.get('item') or '?'}"
        values = self._host_vars(result)
        lines = []
        for error in data.get("argument_errors") or [data.get("msg", "invalid arguments")]:
            name = next((n for n in spec if f"'{n}'" in error or f" {n} " in error), None)
            if name is None:
                lines.append(f"{where}: {error}")
                continue
            value = values.get(name, "?")
            lines.append(f"{where}: {name}={str(value)!r}: must be {_allowed(spec[name])}")
        return lines

    def _host_vars(self, result: Any) -> dict[str, Any]:
        """The raw values the host saw (the result itself carries only the error text)."""
        play = getattr(self, "_current_play", None)
        try:
            manager = play.get_variable_manager()
            return dict(manager.get_vars(play=play, host=result.host, task=result.task))
        except Exception:  # the message is still useful without the value
            return {}


def _allowed(option: dict[str, Any]) -> str:
    choices = option.get("choices")
    if choices:
        return "one of " + ", ".join(str(c) for c in choices)
    kind = option.get("type", "str")
    if kind == "list" and option.get("elements"):
        return f"a list of {option['elements']}"
    return TYPE_WORDS.get(str(kind), str(kind))
