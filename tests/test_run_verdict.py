"""train.yml's verdict: the filter that decides who failed, and the play that uses it.

The unit cases call the filter; the last test runs train.yml's own Verdict play (the plays that
start jobs skipped by tag) on an inventory whose hosts carry the outcomes a run records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ansible_helpers import REPO, load_plugin, playbook, scratch_checkout, show

run = load_plugin(REPO / "ansible" / "plugins" / "filter" / "smolcluster_run.py")
HOSTS = ["mini1", "mini2", "pi4"]
SERVERS = ["mini1"]


def exited(code: Any) -> dict[str, Any]:
    return {"trainer__in_run": True, "trainer__outcome": {"state": "exited", "exit": code}}


OK = exited(0)


def verdict(hostvars: dict[str, dict[str, Any]], mode: str = "sync") -> dict[str, list[str]]:
    return run.run_verdict(HOSTS, hostvars, SERVERS, mode)


def test_a_run_where_every_job_exited_0_passes() -> None:
    assert verdict(dict.fromkeys(HOSTS, OK)) == {"died": [], "failed": [], "left_early": []}


def test_hosts_outside_the_run_are_not_judged() -> None:
    assert verdict({"mini1": OK, "mini2": OK, "pi4": {}})["died"] == []
    assert verdict({"mini1": OK, "mini2": OK, "pi4": {"trainer__in_run": False}})["died"] == []


@pytest.mark.parametrize(
    "pi4",
    [
        exited(1),
        exited(137),
        exited(None),  # an exit file that held no number
        {"trainer__in_run": True, "trainer__outcome": {"state": "dead", "exit": None}},
        {"trainer__in_run": True, "trainer__outcome": {"state": "absent", "exit": None}},
        {"trainer__in_run": True},  # failed mid-play: never recorded an outcome
    ],
)
def test_a_sync_run_fails_on_any_job_that_did_not_exit_0(pi4: dict[str, Any]) -> None:
    result = verdict({"mini1": OK, "mini2": OK, "pi4": pi4})
    assert result == {"died": ["pi4"], "failed": ["pi4"], "left_early": []}


def test_an_elastic_run_fails_only_on_the_server() -> None:
    workers_left = verdict({"mini1": OK, "mini2": exited(1), "pi4": {"trainer__in_run": True}},
                           "elastic")  # fmt: skip
    assert workers_left == {"died": ["mini2", "pi4"], "failed": [], "left_early": ["mini2", "pi4"]}
    server_died = verdict({"mini1": exited(1), "mini2": exited(1), "pi4": OK}, "elastic")
    assert server_died == {"died": ["mini1", "mini2"], "failed": ["mini1"],
                           "left_early": ["mini2"]}  # fmt: skip


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return scratch_checkout(tmp_path_factory.mktemp("verdict"))


@pytest.mark.parametrize(
    ("mode", "outcomes", "rc", "expected"),
    [
        ("sync", {"pi4": exited(1)}, 2, ["training failed on: pi4", "pi4: its job exited with "
                                          "exit code 1", "pi4: no log fetched"]),
        ("elastic", {"mini2": {"trainer__in_run": True}}, 0, ["the job of mini2 ended early",
                                                              "run r1 finished"]),
    ],
)  # fmt: skip
def test_train_yml_verdict_play(
    checkout: Path, mode: str, outcomes: dict[str, Any], rc: int, expected: list[str]
) -> None:
    hosts = {
        host: {
            "ansible_connection": "local",
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
            "trainer__cluster_config": {"mode": mode},
            **outcomes.get(host, OK),
        }
        for host in HOSTS
    }
    inventory = checkout / "inventory" / f"verdict-{mode}.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {
        "server": {"hosts": {"mini1": hosts["mini1"]}},
        "workers": {"hosts": {h: hosts[h] for h in HOSTS[1:]}},
    }}}))  # fmt: skip
    result = playbook(
        checkout, "train.yml", "-i", str(inventory), "--skip-tags", "preflight,trainer,logs",
        "-e", "smolcluster_run_id=r1", timeout=120,
    )  # fmt: skip
    assert result.returncode == rc, show(result)
    out = " ".join(result.stdout.split())
    for text in expected:
        assert text in out, show(result)
    assert "TASK [trainer" not in result.stdout  # no job started: only the verdict was judged
