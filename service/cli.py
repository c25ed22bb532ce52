"""``ndot``: run the service (``serve``, ``api``, ``worker``) or the offline commands (``train|eval|compare``).

    ndot serve    API + worker in one process; the embedded bus unless REDIS_URL is set
    ndot api      the HTTP API alone (needs REDIS_URL; workers run apart)
                  both need API keys (NDOT_INGEST_KEYS / NDOT_ADMIN_KEYS) or --insecure-local
    ndot worker   the worker alone (needs REDIS_URL); serves its own /metrics on --worker-metrics-port
    ndot workers --nproc N   N worker ranks under torchrun, streams sharded, weights kept in step
    ndot train|eval|compare ...   handed to ndot_core.experiments.cli
    ndot export RUN_OR_CHECKPOINT --format nir --out FILE   a trained network as a NIR file (service.export)

Every setting of ``service.settings.Settings`` is a flag (``--max-streams 32``) and an env var
(``NDOT_MAX_STREAMS=32``; ``REDIS_URL`` without prefix); flags win over env vars.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.settings import Settings

OFFLINE_COMMANDS = ("train", "eval", "compare")
log = logging.getLogger("ndot.cli")


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=INFO logger=ndot.worker event=...`` (messages are already key=value)."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"ts={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')} level={record.levelname} "
            f"logger={record.name} {record.getMessage()}"
        )
        return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)


# --- flags generated from the settings -----------------------------------------------------------


def _flag_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """argparse ``type`` / ``choices`` for a settings annotation (Optional unwrapped)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in args if a is not type(None))
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return str, {"choices": list(args)}
    if annotation is bool:
        return bool, {}
    if annotation in (int, float):
        return annotation, {}
    if annotation is Path:
        return Path, {}
    return str, {}


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field; the help says its env var and default."""
    group = parser.add_argument_group("settings (flag > env var > default)")
    for name, info in Settings.model_fields.items():
        kind, extra = _flag_type(info.annotation)
        env = "REDIS_URL" if name == "redis_url" else f"NDOT_{name.upper()}"
        help_text = f"{info.description} [env {env}; default {info.default!r}]".replace("%", "%%")
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(
                flag, dest=name, type=kind, default=None, metavar=name.upper(), help=help_text, **extra
            )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Env vars, overridden by the flags given (``--insecure-local`` = ``--auth off``, ``--fresh`` =
    ``--no-restore-on-start``)."""
    given = {
        name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None
    }
    if getattr(args, "insecure_local", False):
        given["auth"] = "off"
    if getattr(args, "fresh", False):
        given["restore_on_start"] = False
    return Settings(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ndot",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("serve", "API + worker in one process (embedded bus unless REDIS_URL is set)"),
        ("api", "the HTTP API alone, publishing to Redis (REDIS_URL); run workers apart"),
        ("worker", "the worker alone, reading from Redis (REDIS_URL); /metrics on --worker-metrics-port"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        if name != "worker":
            sub.add_argument(
                "--insecure-local",
                action="store_true",
                help="no API keys (same as --auth off / NDOT_AUTH=off): for a service only you can "
                "reach; the server logs a warning at start",
            )
        if name != "api":
            sub.add_argument(
                "--fresh",
                action="store_true",
                help="start from fresh weights: do not restore the newest checkpoint of NDOT_CHECKPOINT_DIR "
                "(same as --no-restore-on-start / NDOT_RESTORE_ON_START=false); the start-up log names "
                "the checkpoint restored otherwise",
            )
        add_settings_flags(sub)
    for name in OFFLINE_COMMANDS:
        commands.add_parser(
            name, help=f"offline {name} (ndot_core.experiments.cli; its own --help)", add_help=False
        )
    commands.add_parser(
        "workers", help="N worker ranks under torchrun, one model (its own --help)", add_help=False
    )
    commands.add_parser(
        "export", help="a run or checkpoint as a NIR file (service.export; its own --help)", add_help=False
    )
    return parser


# --- commands --------------------------------------------------------------------------------------


def run_http(settings: Settings, run_worker: bool) -> int:
    """Serve until SIGTERM / SIGINT; the exit code: 1 when the in-process worker's last checkpoint failed."""
    import uvicorn

    from service.api.routes.view import close_live_views
    from service.app import create_app
    from service.server import uvicorn_config

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM / SIGINT after its graceful shutdown (exit code -15); after a clean
        shutdown (worker stopped, checkpoint written) the service exits 0 instead."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
            close_live_views(app)  # open live views end now, not at the graceful-shutdown timeout
            super().handle_exit(sig, frame)

    app = create_app(settings, run_worker=run_worker)
    Server(uvicorn_config(app, settings)).run()
    return 1 if any(worker.shutdown_error for worker in app.state.workers) else 0


async def run_worker_apart(settings: Settings) -> int:
    """The worker as its own process: Redis bus, own /metrics, checkpoint on SIGTERM / SIGINT.

    Returns the exit code: 1 when the checkpoint on the way out failed (logged in one line), else 0.
    """
    from prometheus_client import start_http_server

    from service.bus import make_bus
    from service.metrics import ServiceMetrics
    from service.worker.cluster_member import from_environment
    from service.worker.loop import Worker

    member = from_environment(settings)  # a rank of `ndot workers` (torchrun), or None
    metrics = ServiceMetrics(settings.accuracy_window)
    if settings.worker_metrics_port:  # rank r serves on the port + r
        port = settings.worker_metrics_port + (member.rank if member else 0)
        start_http_server(port, addr=settings.host, registry=metrics.registry)
    bus = make_bus(settings)
    try:
        worker = Worker(settings, bus, metrics, cluster=member)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.request_stop)
        await worker.start()  # waits (and logs once) while Redis is unreachable or refuses writes
        await worker.run()
    finally:
        await bus.close()
        if member is not None:
            member.leave()
    return 1 if worker.shutdown_error else 0


def run_workers(argv: list[str]) -> int:
    """``ndot workers --nproc N [--max-restarts K] [worker flags]``: N worker ranks on this machine.

    A thin wrapper over ``torchrun --standalone --nproc-per-node N --max-restarts K -m service.cli
    worker [worker flags]``: SIGTERM / SIGINT go on to torchrun, which stops the ranks (they stop
    together, each writes its checkpoint), and then exits 0; otherwise torchrun's exit code. For
    ranks on several machines, run torchrun with a rendezvous yourself (docs/scale-out.md).
    """
    parser = argparse.ArgumentParser(
        prog="ndot workers",
        description="Run N worker ranks on this machine under torchrun (torch.distributed): the streams' "
        "shards are split between them and their weights kept in step (docs/scale-out.md). Every other "
        "flag is a flag of `ndot worker` (see `ndot worker --help`); REDIS_URL is required.",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=int(os.environ.get("NDOT_WORKER_RANKS", "2")),
        help="worker ranks to start (env NDOT_WORKER_RANKS; default 2)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="times torchrun restarts the ranks after one dies (default 3)",
    )
    own, rest = parser.parse_known_args(argv)
    if own.nproc < 1 or own.max_restarts < 0:
        parser.error("--nproc must be >= 1 and --max-restarts >= 0")
    if not (os.environ.get("REDIS_URL") or os.environ.get("NDOT_REDIS_URL") or "--redis-url" in rest):
        print(
            "ndot workers: needs REDIS_URL (or --redis-url): the ranks share the streams through Redis",
            file=sys.stderr,
        )
        return 2
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={own.nproc}",
        f"--max-restarts={own.max_restarts}",
        "-m",
        "service.cli",
        "worker",
        *rest,
    ]
    log.info("event=starting_workers nproc=%d command=%r", own.nproc, " ".join(command))
    torchrun = subprocess.Popen(command)
    stopping: list[int] = []

    def forward(sig: int, frame: types.FrameType | None) -> None:
        stopping.append(sig)  # torchrun sends it on to the ranks: they stop together, each checkpoints
        torchrun.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = torchrun.wait()
    if stopping:  # torchrun reports the signal it was stopped with as a failure; a stop asked for is not
        log.info("event=workers_stopped signal=%d torchrun_exit=%d", stopping[0], code)
        return 0
    return code


def run_offline(argv: list[str]) -> int:
    try:
        module = importlib.import_module("ndot_core.experiments.cli")
    except ModuleNotFoundError as err:
        if err.name != "ndot_core.experiments.cli":
            raise
        print(
            f"ndot {argv[0]}: the offline commands (ndot_core.experiments.cli) are not installed in this build",
            file=sys.stderr,
        )
        return 2
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in OFFLINE_COMMANDS:
        return run_offline(argv)
    if argv and argv[0] == "workers":
        return run_workers(argv[1:])
    if argv and argv[0] == "export":
        from service.export import main as export_main

        return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    configure_logging(settings)
    if not faulthandler.is_enabled():  # a native crash (torch, gloo) prints every thread's Python stack
        with contextlib.suppress(AttributeError, ValueError, OSError):  # (a stderr with no file number)
            faulthandler.enable()
    if args.command in ("api", "worker") and not settings.redis_url:
        print(
            f"ndot {args.command}: needs REDIS_URL (or --redis-url): the embedded bus lives inside one "
            "process, use `ndot serve` for it",
            file=sys.stderr,
        )
        return 2
    log.info(
        "event=starting command=%s bus=%s model=%s",
        args.command,
        "redis" if settings.redis_url else "embedded",
        settings.model,
    )
    if args.command == "worker":
        return asyncio.run(run_worker_apart(settings))
    from service.api.auth import AuthConfigError

    try:
        return run_http(settings, run_worker=args.command == "serve")
    except AuthConfigError as err:
        print(f"ndot {args.command}: refusing to start: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
