"""The metrics JSONL's schema: every event kind and its fields, declared once.

Each line of <metrics_dir>/<host>.jsonl is one record: {"event": kind, "time", "wall", ...}.
`Metrics.write` checks what it writes against the kinds below; the watcher, the report, the
tests and the benchmarks read through `read_records` / `RecordStream`, which check the same.
A record is a plain dict typed as a TypedDict, so `record["step"]` reads as before and a type
checker narrows on `record["event"]`.

One kind, several writers: the fields a writer adds are grouped below by who writes them.
Elastic mode's merge (server) and push (worker) are `step` records too. The server writes a
`member` record whenever a worker joins, starts training or leaves (with the reason); each sync
step's `batch_sizes` says who answered, elastic's `workers` how many are active.
Bump SCHEMA_VERSION when the schema changes; the start record carries it. A reader reads every
version in READABLE: a newer schema that only added kinds or fields still reads older files.
"""

from __future__ import annotations

import json
import os
import reprlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, cast, overload

from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from typing_extensions import NotRequired, TypedDict  # pydantic needs these below 3.12

SCHEMA_VERSION = 2  # 2: the member kind
READABLE = (1, 2)
STRICT_ENV = "SMOLCLUSTER_STRICT_METRICS"  # "1": a bad record raises in the writer too

# strict: no coercion ("3" is not 3, true is not 1); extra="forbid": a misspelt field is an error.
_RULES = ConfigDict(strict=True, extra="forbid")


@with_config(_RULES)
class WorkerTotals(TypedDict):
    """What one worker host did over the run (summary `workers`, keyed by host)."""

    steps: int
    samples: int
    bytes_sent: int
    bytes_recv: int
    connections: NotRequired[int]  # socket server: connections it made (rejoins count)
    samples_per_s: NotRequired[float]  # socket server: over its connected time
    seconds: NotRequired[float]  # gloo: its training loop's time


@with_config(_RULES)
class StartRecord(TypedDict):
    event: Literal["start"]
    time: float  # Unix seconds
    wall: float  # seconds since this process opened the file
    schema: int  # SCHEMA_VERSION of the writer (added by Metrics.write)
    role: Literal["server", "worker", "local"]
    host: str
    mode: Literal["sync", "elastic", "local"]
    backend: Literal["socket", "gloo", "none"]
    dataset: str
    workers: int  # workers configured
    total_steps: int
    rank: NotRequired[int]  # socket worker, gloo
    quantization: NotRequired[bool]  # socket server
    balance: NotRequired[Literal["off", "auto"]]  # socket server
    resumed_at: NotRequired[int | None]  # socket server: the checkpoint's step, None if fresh
    world_size: NotRequired[int]  # gloo
    batch_size: NotRequired[int]  # gloo
    grad_bytes: NotRequired[int]  # gloo


@with_config(_RULES)
class StepRecord(TypedDict):
    event: Literal["step"]
    time: float
    wall: float
    step: int  # sync: the step done; elastic server: merges so far; elastic worker: local steps
    loss: float | None  # training loss (elastic merge: the pushing worker's, if it sent one)
    epoch: NotRequired[int]  # sync server/worker, local, gloo
    samples: NotRequired[int]  # this step's (elastic worker: this push's); elastic server: so far
    bytes_sent: NotRequired[int]  # cumulative, this process
    bytes_recv: NotRequired[int]
    # start to start (None on a sync worker's first step); elastic worker: push to push
    step_time_s: NotRequired[float | None]
    samples_per_s: NotRequired[float | None]
    grad_norms: NotRequired[dict[str, float]]  # track_gradients: per parameter
    # sync server
    workers: NotRequired[int]  # also elastic server: active workers
    batch_sizes: NotRequired[dict[str, int]]  # host -> samples, in order of arrival
    exchange_s: NotRequired[float]  # of step_time_s: gradients asked for to the last AVERAGE sent
    # sync and elastic workers: compute + encode/send + wait make up step_time_s
    wait_s: NotRequired[float | None]  # sync: gradients sent to next step; elastic: the reply
    compute_s: NotRequired[float]  # sync: forward/backward; elastic: the K local steps
    # elastic server (a merge)
    host: NotRequired[str]  # who pushed
    staleness: NotRequired[int]
    merge_weight: NotRequired[float]
    # elastic worker (a push)
    version: NotRequired[int]  # the server version its update started from
    # gloo
    comm_s: NotRequired[float]


@with_config(_RULES)
class EvalRecord(TypedDict):
    event: Literal["eval"]
    time: float
    wall: float
    step: int
    epoch: int
    val_loss: float
    val_accuracy: float


@with_config(_RULES)
class SummaryRecord(TypedDict):
    event: Literal["summary"]
    time: float
    wall: float
    role: Literal["server", "worker", "local"]
    host: str
    steps: int
    mode: NotRequired[Literal["sync", "elastic"]]  # socket server
    backend: NotRequired[Literal["gloo"]]
    rank: NotRequired[int]  # socket worker
    dataset: NotRequired[str]
    final_accuracy: NotRequired[float]  # server, local, gloo rank 0 (NaN if never evaluated)
    final_val_loss: NotRequired[float]
    samples: NotRequired[int]
    samples_per_s: NotRequired[float]
    bytes_sent: NotRequired[int]
    bytes_recv: NotRequired[int]
    checksum_mismatches: NotRequired[int]
    workers: NotRequired[dict[str, WorkerTotals]]  # server, gloo rank 0
    # gloo
    bytes_source: NotRequired[str]
    param_sha256: NotRequired[str]
    replicas_identical: NotRequired[bool]
    cluster_samples: NotRequired[int]
    cluster_samples_per_s: NotRequired[float]


@with_config(_RULES)
class MemberRecord(TypedDict):
    """Socket server: a worker joined (waits for the next step), started, or left."""

    event: Literal["member"]
    time: float
    wall: float
    host: str
    change: Literal["joined", "started", "left"]
    step: int  # the run's step (elastic: merges) when it happened
    workers: int  # training after the change
    reason: NotRequired[str]  # left: why (its connection ended, a deadline, a bad frame)


Record = StartRecord | StepRecord | EvalRecord | MemberRecord | SummaryRecord
KINDS: dict[str, type[Any]] = {
    "start": StartRecord,
    "step": StepRecord,
    "eval": EvalRecord,
    "member": MemberRecord,
    "summary": SummaryRecord,
}
_ADAPTERS = {kind: TypeAdapter(cls) for kind, cls in KINDS.items()}


class RecordError(ValueError):
    """A record that does not match the schema (the writer's view: no file position)."""


class MetricsFileError(ValueError):
    """A malformed line in a metrics file; the message starts with <file>:<line>:."""

    def __init__(self, name: str, line: int, problem: str) -> None:
        super().__init__(f"{name}:{line}: {problem}")
        self.name, self.line, self.problem = name, line, problem


def strict() -> bool:
    """Whether the writer raises on a bad record (tests) or logs it and writes it (training)."""
    return os.environ.get(STRICT_ENV) == "1"


def validate(record: Any) -> Record:
    """The record, checked against its kind; RecordError says what is wrong."""
    if not isinstance(record, dict):
        raise RecordError(f"a record is a JSON object, not {type(record).__name__}")
    kind = record.get("event")
    adapter = _ADAPTERS.get(kind) if isinstance(kind, str) else None
    if adapter is None:
        raise RecordError(f"event {kind!r}: not one of {', '.join(KINDS)}")
    if kind == "start" and record.get("schema") not in READABLE:
        found = record.get("schema")
        written = (
            "no schema version (an older smolcluster wrote it)"
            if found is None
            else (f"schema {found!r}")
        )
        known = " and ".join(map(str, READABLE))
        raise RecordError(f"start record: {written}; this reader knows schema {known}")
    try:
        adapter.validate_python(record)
    except ValidationError as exc:
        raise RecordError(f"{kind} record: {_problems(exc)}") from None
    return cast(Record, record)  # checked: it is the TypedDict of its kind


def _problems(exc: ValidationError) -> str:
    """`field: what (got value)` per error: `loss: Input should be a valid number (got '1')`."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or "-"
        got = "" if error["type"] == "missing" else f" (got {reprlib.repr(error['input'])})"
        parts.append(f"{where}: {error['msg']}{got}")
    return "; ".join(parts)


class RecordStream:
    """Records from a file read in chunks, as it grows (the watcher's live file).

    Only complete lines are parsed: the text after the last newline is kept until the rest of
    it arrives, so a line the writer is still writing (or a torn last line of a job that died
    mid-write) is never an error. Every complete line must be a valid record.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines = 0  # complete lines consumed
        self._partial = b""

    def feed(self, chunk: bytes) -> Iterator[Record]:
        """The records the chunk completes, parsed as they are taken: the ones before a bad line
        are yielded before its error is raised. Take them all before feeding the next chunk."""
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        return map(self._parse, complete)

    def _parse(self, raw: bytes) -> Record:
        self.lines += 1
        try:
            record = json.loads(raw)
        except ValueError as exc:
            raise MetricsFileError(self.name, self.lines, f"not JSON: {exc}") from None
        try:
            return validate(record)
        except RecordError as exc:
            raise MetricsFileError(self.name, self.lines, str(exc)) from None


def read_records(path: Path) -> Iterator[Record]:
    """Every complete record of a metrics file, in order (a torn last line is left out).

    The file is read at the call; its lines are checked as they are taken."""
    return RecordStream(str(path)).feed(path.read_bytes())


@overload
def of_kind(records: Iterable[Record], kind: Literal["start"]) -> list[StartRecord]: ...
@overload
def of_kind(records: Iterable[Record], kind: Literal["step"]) -> list[StepRecord]: ...
@overload
def of_kind(records: Iterable[Record], kind: Literal["eval"]) -> list[EvalRecord]: ...
@overload
def of_kind(records: Iterable[Record], kind: Literal["member"]) -> list[MemberRecord]: ...
@overload
def of_kind(records: Iterable[Record], kind: Literal["summary"]) -> list[SummaryRecord]: ...
@overload
def of_kind(records: Iterable[Record], kind: str) -> list[Any]: ...
def of_kind(records: Iterable[Record], kind: str) -> list[Any]:
    """The records of one kind, in order; a kind the schema does not declare is an error."""
    if kind not in KINDS:
        raise RecordError(f"event {kind!r}: not one of {', '.join(KINDS)}")
    return [r for r in records if r["event"] == kind]
