"""Load and validate the two YAML files: the cluster config and the NN config.

Everything is checked before anything starts; a problem becomes one ConfigError that names the
file and the key, which the CLI prints as a single line with exit status 2.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from smolcluster.cipher import AUTO, Cipher

PACKAGED_CONFIGS = Path(__file__).parent / "configs"


class ConfigError(Exception):
    """A config file is unreadable or invalid; `key` is the dotted path of the offending key."""

    def __init__(self, file: Path | str, key: str, message: str) -> None:
        super().__init__(f"{file}: {key}: {message}")
        self.file, self.key, self.message = str(file), key, message


class _Strict(BaseModel):
    # Unknown keys are typos until proven otherwise; no silent coercion of "3" into 3.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ClusterConfig(_Strict):
    host_ip: dict[str, str]
    port: int = Field(ge=1, le=65535)
    num_workers: int = Field(ge=1)
    workers: list[str] = Field(min_length=1)
    server: str
    worker_update_interval: int = Field(default=50, ge=1)
    use_quantization: bool = False
    seed: int = 42
    mode: Literal["sync", "elastic"] = "sync"
    backend: Literal["socket", "gloo"] = "socket"
    bind_address: str = "0.0.0.0"
    # The AEAD of every session frame; auto: the server picks by its CPU, workers follow.
    cipher: Literal["auto", Cipher] = AUTO
    secret_file: str = "secret"
    metrics_dir: str = "runs/latest"
    checkpoint_dir: str = "checkpoints"
    checkpoint_every: int = Field(default=100, ge=1)
    max_frame_bytes: int = Field(default=256 * 1024 * 1024, ge=4096)
    # The original retried 60 times, 3 s apart; we back off exponentially up to the cap.
    connect_retries: int = Field(default=60, ge=1)
    connect_backoff_s: float = Field(default=3.0, gt=0)
    # Whole-phase deadlines of a connection (docs/protocol.md, "Limits and deadlines").
    handshake_timeout_s: float = Field(default=10.0, gt=0)
    frame_timeout_s: float = Field(default=30.0, gt=0)
    send_timeout_s: float = Field(default=30.0, gt=0)
    # Connections being authenticated at once, in all and from one address; more are closed.
    max_handshakes: int = Field(default=64, ge=1)
    max_handshakes_per_address: int = Field(default=16, ge=1)
    join_timeout_s: float = Field(default=300.0, gt=0)
    step_timeout_s: float = Field(default=60.0, gt=0)
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    heartbeat_timeout_s: float = Field(default=15.0, gt=0)
    push_interval: int | None = Field(default=None, ge=1)  # elastic K; None: update interval
    checksum_interval: int = Field(default=50, ge=1)
    server_trains: bool = False
    min_workers: int = Field(default=1, ge=1)
    staleness_exponent: float = Field(default=0.5, ge=0)
    server_lr: float = Field(default=1.0, gt=0)
    server_momentum: float = Field(default=0.0, ge=0, lt=1)  # elastic outer Nesterov
    gloo_ifname: str | None = None
    # Several trainers sharing one machine fight over OpenMP threads; 1 each is far faster there.
    torch_threads: int | None = Field(default=None, ge=1)
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    # sync: "auto" sizes each worker's batch by its measured throughput (docs/algorithms.md).
    balance: Literal["off", "auto"] = "off"
    # sync (balance off): survivors also compute the batches of absent workers' shards, so every
    # step keeps the configured global batch and sample stream (docs/algorithms.md).
    cover_absent: bool = True
    # Debug: host -> seconds to sleep per step of batch_size samples (scaled by the samples a
    # balanced sync step assigns), to emulate a slow machine.
    throttle_s: dict[str, float] = Field(default_factory=dict)

    @field_validator("host_ip")
    @classmethod
    def _addresses(cls, value: dict[str, str]) -> dict[str, str]:
        for host, address in value.items():
            _check_address(address, f"host_ip.{host}")
        return value

    @field_validator("balance", mode="before")
    @classmethod
    def _balance_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false; `balance: off` still means off.
        return "off" if value is False else value

    @field_validator("bind_address")
    @classmethod
    def _bind(cls, value: str) -> str:
        return _check_address(value, "bind_address")

    @model_validator(mode="after")
    def _consistent(self) -> ClusterConfig:
        if self.num_workers != len(self.workers):
            raise _KeyError(
                "num_workers", f"is {self.num_workers} but workers lists {len(self.workers)} hosts"
            )
        if len(set(self.workers)) != len(self.workers):
            raise _KeyError("workers", "lists a host twice")
        if self.server in self.workers:
            raise _KeyError("workers", f"includes the server {self.server!r}")
        for index, worker in enumerate(self.workers):
            if worker not in self.host_ip:
                raise _KeyError(
                    f"workers.{index}", f"{worker!r} has no entry in host_ip (the address it dials)"
                )
        if self.server not in self.host_ip:
            raise _KeyError("server", f"{self.server!r} has no entry in host_ip")
        if self.min_workers > self.num_workers:
            raise _KeyError("min_workers", "is larger than num_workers")
        for host in self.throttle_s:
            if host not in self.workers:
                raise _KeyError(f"throttle_s.{host}", "is not a worker")
        if self.balance == "auto" and (self.mode, self.backend) != ("sync", "socket"):
            where = f"mode {self.mode}, backend {self.backend}"
            raise _KeyError("balance", f"auto needs mode sync and backend socket, not {where}")
        if self.use_quantization and self.backend == "gloo":  # gloo all-reduces fp32 only
            raise _KeyError("use_quantization", "true needs backend socket, not backend gloo")
        return self

    def rank_of(self, host: str) -> int:
        return self.workers.index(host) + 1


class ModelConfig(_Strict):
    type: Literal["SimpleNN"] = "SimpleNN"
    input_dim: int = Field(default=784, ge=1)
    hidden: int = Field(default=128, ge=1)
    out: int = Field(default=10, ge=2)


class DatasetConfig(_Strict):
    name: Literal["MNIST"] = "MNIST"
    root: str = "data"
    download: bool = False


class NNConfig(_Strict):
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    # cosine: decays to 0 over the run, following the global step (sync) or progress (elastic).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    num_epochs: int = Field(ge=1)
    eval_steps: int = Field(default=200, ge=1)
    track_gradients: bool = False
    # Adam in one fused kernel (torch >= 2.4). It rounds differently from the per-operation
    # kernel, so every host of a run must agree: false for a cluster with an older torch.
    fused_adam: bool = True
    max_steps: int | None = Field(default=None, ge=1)
    model: ModelConfig = ModelConfig()
    dataset: DatasetConfig = DatasetConfig()

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _float_lr(cls, value: Any) -> Any:
        # YAML reads `1` as an int; a whole-number learning rate is still a learning rate.
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class _KeyError(ValueError):
    """Raised inside validators to point at a key other than the one being validated."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Settings:
    """Both configs, validated, with relative paths resolved against their file's directory."""

    cluster: ClusterConfig
    nn: NNConfig
    cluster_file: Path
    nn_file: Path

    def cluster_path(self, value: str) -> Path:
        return _resolve(_base_dir(self.cluster_file), value)

    @property
    def secret_path(self) -> Path:
        return self.cluster_path(self.cluster.secret_file)

    @property
    def metrics_dir(self) -> Path:
        return self.cluster_path(self.cluster.metrics_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.cluster_path(self.cluster.checkpoint_dir)

    @property
    def data_root(self) -> Path:
        return _resolve(_base_dir(self.nn_file), self.nn.dataset.root)


MODELS: dict[str, type[BaseModel]] = {"cluster": ClusterConfig, "nn": NNConfig}


def config_fields(which: str) -> dict[str, FieldInfo]:
    """Every key of one file ("cluster" or "nn"), nested sections as dotted keys (`model.out`).

    The one list of knobs: the CLI flags, the README tables and the Ansible role are checked
    against it (tests/test_config_contract.py).
    """
    return dict(_fields(MODELS[which]))


def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _fields(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def value_type(field: FieldInfo) -> Any:
    """The type a key's value has when set: `int | None` is int; a Literal stays a Literal."""
    kind = field.annotation
    args = [arg for arg in get_args(kind) if arg is not type(None)]
    return args[0] if get_origin(kind) is UnionType and len(args) == 1 else kind


# Short name -> (which file, dotted key): the CLI's flags (--max-steps) and train.yml's -e
# overrides (-e max_steps=...) both use these names. Overrides apply after both files are read.
OVERRIDES: dict[str, tuple[str, str]] = {
    "epochs": ("nn", "num_epochs"),
    "batch_size": ("nn", "batch_size"),
    "lr": ("nn", "learning_rate"),
    "lr_schedule": ("nn", "lr_schedule"),
    "max_steps": ("nn", "max_steps"),
    "eval_steps": ("nn", "eval_steps"),
    "data_root": ("nn", "dataset.root"),
    "mode": ("cluster", "mode"),
    "backend": ("cluster", "backend"),
    "balance": ("cluster", "balance"),
    "port": ("cluster", "port"),
    "metrics_dir": ("cluster", "metrics_dir"),
    "use_quantization": ("cluster", "use_quantization"),
    "seed": ("cluster", "seed"),
    "min_workers": ("cluster", "min_workers"),
    "checkpoint_every": ("cluster", "checkpoint_every"),
    "connect_retries": ("cluster", "connect_retries"),
    "connect_backoff_s": ("cluster", "connect_backoff_s"),
    "handshake_timeout_s": ("cluster", "handshake_timeout_s"),
    "join_timeout_s": ("cluster", "join_timeout_s"),
    "step_timeout_s": ("cluster", "step_timeout_s"),
    "heartbeat_interval_s": ("cluster", "heartbeat_interval_s"),
}


def load_settings(
    cluster_file: Path | str | None = None,
    nn_file: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read, override and validate both files; raise ConfigError naming the first bad key."""
    cluster_path = Path(cluster_file or PACKAGED_CONFIGS / "cluster_config.yaml").resolve()
    nn_path = Path(nn_file or PACKAGED_CONFIGS / "nn_config.yaml").resolve()
    raw = {"cluster": _read_yaml(cluster_path), "nn": _read_yaml(nn_path)}
    for flag, value in (overrides or {}).items():
        if value is None:
            continue
        which, dotted = OVERRIDES[flag]
        _set_dotted(raw[which], dotted, value)
    # Overridden paths are relative to where the user typed them, not to the config file.
    for flag in ("data_root", "metrics_dir"):
        if (overrides or {}).get(flag) is not None:
            which, dotted = OVERRIDES[flag]
            _set_dotted(raw[which], dotted, str(Path(overrides[flag]).resolve()))
    cluster = _validate(ClusterConfig, raw["cluster"], cluster_path)
    nn = _validate(NNConfig, raw["nn"], nn_path)
    return Settings(cluster=cluster, nn=nn, cluster_file=cluster_path, nn_file=nn_path)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(path, "-", f"cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "-"
        raise ConfigError(path, where, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "-", "must be a YAML mapping of keys to values")
    return data


def _validate(model: type[_Strict], data: dict[str, Any], path: Path) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"]) or "-"
        message = error["msg"]
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, _KeyError):
            key, message = cause.key, str(cause)
        elif error["type"] == "extra_forbidden":
            message = "unknown key (typo?)"
        elif error["type"] == "missing":
            message = "missing required key"
        elif "input" in error and error["type"] not in ("value_error",):
            message = f"{message} (got {error['input']!r})"
        raise ConfigError(path, key, message.removeprefix("Value error, ")) from None


def _check_address(value: str, key: str) -> str:
    if value in ("localhost",):
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise _KeyError(key, f"{value!r} is not an IP address") from None
    return value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def _base_dir(config_file: Path) -> Path:
    # The packaged defaults live in site-packages; their relative paths mean "here".
    return Path.cwd() if config_file.parent == PACKAGED_CONFIGS.resolve() else config_file.parent


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()
