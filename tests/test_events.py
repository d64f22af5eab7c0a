"""The metrics schema: what the writer accepts, what the reader accepts, and where it says no."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from smolcluster import events
from smolcluster.events import (
    SCHEMA_VERSION,
    MetricsFileError,
    RecordError,
    RecordStream,
    of_kind,
    read_records,
    validate,
)
from smolcluster.metrics import Metrics

# One record of every kind per writer, with the fields that writer sets today (server.py,
# elastic.py, worker.py, local.py, gloo_backend.py): the round trip below writes each through
# Metrics.write and reads it back.
TOTALS = {"steps": 4, "samples": 128, "bytes_sent": 10, "bytes_recv": 20}
WRITES: list[tuple[str, dict[str, Any]]] = [
    ("start", {"role": "server", "host": "mini1", "mode": "sync", "backend": "socket",
               "dataset": "offline digits", "workers": 2, "total_steps": 8,
               "quantization": False, "balance": "auto", "resumed_at": None}),
    ("start", {"role": "worker", "host": "mini2", "rank": 0, "mode": "elastic",
               "backend": "socket", "dataset": "d", "workers": 2, "total_steps": 8}),
    ("start", {"role": "local", "host": "mini1", "mode": "local", "backend": "none",
               "dataset": "d", "workers": 2, "total_steps": 8}),
    ("start", {"role": "worker", "host": "pi4", "mode": "sync", "backend": "gloo",
               "dataset": "d", "workers": 1, "total_steps": 8, "rank": 1, "world_size": 2,
               "batch_size": 32, "grad_bytes": 4096}),
    ("step", {"step": 1, "epoch": 0, "loss": 2.3, "samples": 64, "workers": 2,
              "batch_sizes": {"mini2": 32, "pi4": 32}, "step_time_s": 0.1,
              "samples_per_s": 640.0, "bytes_sent": 1, "bytes_recv": 2,
              "grad_norms": {"fc.weight": 0.5}}),  # sync server
    ("step", {"step": 3, "host": "mini2", "staleness": 1, "merge_weight": 0.25, "samples": 96,
              "loss": None, "workers": 2, "bytes_sent": 1, "bytes_recv": 2}),  # elastic merge
    ("step", {"wait_s": None, "step_time_s": None, "step": 1, "epoch": 0, "loss": 2.2,
              "samples": 32, "compute_s": 0.05, "bytes_sent": 1, "bytes_recv": 2}),  # worker
    ("step", {"step": 8, "loss": 1.9, "version": 3, "bytes_sent": 1, "bytes_recv": 2}),  # push
    ("step", {"step": 1, "epoch": 0, "loss": 2.0, "samples": 64}),  # local
    ("step", {"step": 1, "epoch": 0, "loss": 2.0, "samples_per_s": 100.0, "bytes_sent": 1,
              "bytes_recv": 2, "step_time_s": 0.2, "comm_s": 0.01}),  # gloo
    ("eval", {"step": 2, "epoch": 0, "val_loss": 1.6, "val_accuracy": 0.61}),
    ("summary", {"role": "server", "host": "mini1", "mode": "sync", "steps": 8,
                 "final_accuracy": 0.9, "final_val_loss": 0.3, "dataset": "d", "samples": 512,
                 "checksum_mismatches": 0, "bytes_sent": 1, "bytes_recv": 2,
                 "workers": {"mini2": {**TOTALS, "connections": 2, "samples_per_s": 9.5}}}),
    ("summary", {"role": "worker", "host": "mini2", "rank": 0, "steps": 8, "samples": 256,
                 "samples_per_s": 90.5, "bytes_sent": 1, "bytes_recv": 2}),
    ("summary", {"role": "local", "host": "mini1", "steps": 8, "final_accuracy": float("nan"),
                 "final_val_loss": float("nan"), "dataset": "d"}),
    ("member", {"host": "pi4", "change": "left", "step": 7, "workers": 2,
                "reason": "send failed: timed out"}),
    ("member", {"host": "pi4", "change": "started", "step": 9, "workers": 3}),
    ("summary", {"role": "server", "host": "mini1", "backend": "gloo", "steps": 8,
                 "samples": 256, "samples_per_s": 1.0, "bytes_sent": 1, "bytes_recv": 2,
                 "bytes_source": "psutil", "param_sha256": "ab", "replicas_identical": True,
                 "dataset": "d", "checksum_mismatches": 0, "final_accuracy": 0.9,
                 "final_val_loss": 0.3, "cluster_samples": 512, "cluster_samples_per_s": 2.0,
                 "workers": {"pi4": {**TOTALS, "seconds": 1.5}}}),
]  # fmt: skip


def _metrics(tmp_path: Path, host: str = "mini1") -> Metrics:
    return Metrics(tmp_path, host, "server", "run", "disabled", {})


def _record(event: str, **fields: Any) -> dict[str, Any]:
    return {"event": event, "time": 1.0, "wall": 0.5, **fields}


def test_every_kind_round_trips_through_the_writer_and_reader(tmp_path: Path) -> None:
    metrics = _metrics(tmp_path)
    for event, fields in WRITES:
        metrics.write(event, **fields)
    metrics.close()
    back = list(read_records(tmp_path / "mini1.jsonl"))
    assert [r["event"] for r in back] == [event for event, _ in WRITES]
    assert {r["event"] for r in back} == set(events.KINDS)
    for record, (_, fields) in zip(back, WRITES, strict=True):
        assert json.dumps({k: record[k] for k in fields}) == json.dumps(fields)  # NaN too
        assert isinstance(record["time"], float) and isinstance(record["wall"], float)
    assert [r["schema"] for r in of_kind(back, "start")] == [SCHEMA_VERSION] * 4


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (_record("stepp", step=1), "event 'stepp': not one of start, step, eval, member, summary"),
        ([1, 2], "a record is a JSON object, not list"),
        (_record("step", loss=1.0), "step record: step: Field required"),
        (_record("step", step="3", loss=1.0), "step: Input should be a valid integer (got '3')"),
        (_record("step", step=True, loss=1.0), "step: Input should be a valid integer"),
        (_record("step", step=1, loss=1.0, stepp=2), "stepp: Extra inputs are not permitted"),
        (_record("eval", step=1, epoch=0, val_loss=1.0), "val_accuracy: Field required"),
        (_record("summary", role="boss", host="a", steps=1), "role: Input should be 'server'"),
        (
            _record("summary", role="server", host="a", steps=1, workers={"b": {"steps": 1}}),
            "workers.b.samples: Field required",
        ),
        (
            _record("start", role="server"),
            "start record: no schema version (an older smolcluster wrote it); this reader knows"
            " schema 1 and 2",
        ),
        (_record("start", role="server", schema=3), "start record: schema 3; this reader knows"),
        (_record("member", host="a", change="quit", step=1, workers=0), "change: Input should be"),
    ],
)
def test_validate_rejects_naming_the_field(record: Any, problem: str) -> None:
    with pytest.raises(RecordError) as caught:
        validate(record)
    assert problem in str(caught.value)


def test_the_writer_raises_when_strict_and_logs_once_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = _metrics(tmp_path)
    assert events.strict()  # tests/conftest.py turns it on for every test and trainer
    with pytest.raises(RecordError, match="lossy: Extra inputs"):
        metrics.write("step", step=1, loss=1.0, lossy=2.0)
    monkeypatch.delenv(events.STRICT_ENV)
    with caplog.at_level(logging.ERROR, logger="smolcluster"):
        for step in (1, 2):  # a training run keeps going and keeps the record
            metrics.write("step", step=step, loss=1.0, lossy=float(step))
    metrics.close()
    assert [r.getMessage() for r in caplog.records] == [
        "metrics record does not match the schema (first of its kind): step record: lossy: "
        "Extra inputs are not permitted (got 1.0)"
    ]
    lines = (tmp_path / "mini1.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_a_malformed_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "mini1.jsonl"
    good = json.dumps(_record("step", step=1, loss=1.0))
    for bad, problem in [
        ('{"event": "step", "step": 2', "not JSON"),
        (json.dumps(_record("step", step=2)), "step record: loss: Field required"),
        (json.dumps(_record("merge", step=2)), "event 'merge': not one of"),
        ("", "not JSON"),
    ]:
        path.write_text(f"{good}\n{good}\n{bad}\n{good}\n")
        records = read_records(path)
        assert [next(records)["step"], next(records)["step"]] == [1, 1]  # the good ones first
        with pytest.raises(MetricsFileError) as caught:
            next(records)
        assert str(caught.value).startswith(f"{path}:3: {problem}")
        assert (caught.value.name, caught.value.line) == (str(path), 3)


def test_a_torn_last_line_is_left_for_later(tmp_path: Path) -> None:
    """The watcher reads a file the server is writing: half a line is not an error."""
    good = json.dumps(_record("step", step=1, loss=1.0)) + "\n"
    path = tmp_path / "mini1.jsonl"
    path.write_text(good + good[:20])
    assert len(list(read_records(path))) == 1
    stream = RecordStream("live")
    line = good.encode()
    assert list(stream.feed(line[:10])) == []
    assert list(stream.feed(line[10:] + line[:5])) == [json.loads(good)]
    assert len(list(stream.feed(line[5:] + b'{"event"'))) == 1
    with pytest.raises(MetricsFileError, match=r"^live:3: not JSON"):
        list(stream.feed(b"}\n"))


def test_a_resumed_writer_drops_the_torn_line_it_finds(tmp_path: Path) -> None:
    """A job killed mid-write leaves half a record; the resumed run must not append to it."""
    metrics = _metrics(tmp_path)
    metrics.write("step", step=1, loss=1.0)
    metrics.close()
    path = tmp_path / "mini1.jsonl"
    with path.open("a") as handle:
        handle.write('{"event": "step", "st')
    metrics = _metrics(tmp_path)
    metrics.write("step", step=2, loss=0.5)
    metrics.close()
    assert [r["step"] for r in read_records(path)] == [1, 2]


def test_a_schema_1_run_still_reads() -> None:
    # Schema 2 only added the member kind: yesterday's runs read as they did.
    start = _record("start", schema=1, **WRITES[0][1])
    assert validate(start)["schema"] == 1
