"""``loraserve``: the command line.

Only the standard library and uvicorn are imported at the top; each command imports what it uses. An
engine core that vLLM starts with ``spawn`` (``serving.engine_fork`` says when) first imports the
program's main module again (this one, or the ``loraserve`` script that imports it): with the config,
the store (SQLAlchemy, Alembic) and the admin, keys and routing commands at the top, every such start
paid for another import of them, seconds of CPU that delay the engine's own start.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from functools import partial
from pathlib import Path
from types import FrameType

import uvicorn

logger = logging.getLogger("loraserve")

DEFAULT_DEMO_ROOT = Path(".demo")


class StartupInterrupted(Exception):
    """SIGTERM or SIGINT arrived before the server finished starting."""


class _Server(uvicorn.Server):
    """uvicorn's server, which also stops while the lifespan is still starting the engine.

    uvicorn only notes a signal until start-up completes, and the engine's start
    blocks for seconds to minutes: a pod deleted (or a deployment rolled back)
    during it would wait for the whole start, then shut down. Raised from the
    handler, the exception unwinds whatever start-up is doing; vLLM stops the
    engine processes it started, and the lifespan's ``finally`` closes the rest.
    The signal is handled here, so uvicorn must not raise it again on the way out
    (it would kill the process in the middle of that clean-up); uvicorn reports
    the interrupted start-up as a failed one, and :func:`_serve` exits 0 instead.
    """

    interrupted = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if not self.started and not self.interrupted:
            self.interrupted = True
            self._captured_signals.remove(sig)
            raise StartupInterrupted(f"signal {sig} before start-up completed: stopping")


def _let_go_in_fork(sock: socket.socket) -> None:
    """In a forked engine core (``serving.engine_fork``): close the server's port and its event loop's wakeup fd.

    Held by the engine core, the port would outlive a crashed server and keep the next one from binding
    it; the wakeup socket would carry the engine core's signals to the server's event loop.
    """
    sock.close()
    signal.set_wakeup_fd(-1)  # the last: it raises in a fork from another thread than the main one


def _serve(args: argparse.Namespace) -> int:
    from serving.api.app import build_app
    from serving.config import load_settings

    settings = load_settings(args.config)
    settings.check_files()
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    logging.basicConfig(
        level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # On SIGTERM uvicorn stops accepting connections and lets in-flight requests
    # (streams included) finish for up to the grace period; then the lifespan stops the engine.
    config = uvicorn.Config(
        build_app(settings),
        host=host,
        port=port,
        log_level=settings.server.log_level,
        # uvicorn hints int, but only hands it to asyncio.wait_for, which takes float seconds.
        timeout_graceful_shutdown=settings.server.shutdown_grace_s,  # type: ignore[arg-type]
        timeout_keep_alive=settings.server.keep_alive_s,  # type: ignore[arg-type]
    )
    # Bound before the lifespan starts the engine, as vLLM's own server does: the engine picks
    # free ports for its own sockets, and one of them could otherwise be this port.
    sock = config.bind_socket()
    os.register_at_fork(after_in_child=partial(_let_go_in_fork, sock))
    server = _Server(config)
    try:
        server.run(sockets=[sock])
    except (StartupInterrupted, SystemExit):
        if not server.interrupted:
            raise
        logger.info("stopped by a signal during start-up")
    return 0


def _demo_assets(args: argparse.Namespace) -> int:
    from checkpoints.assets import build_demo_assets

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    assets = build_demo_assets(args.root, force=args.force)
    print(f"demo base model: {assets.base}")
    for name, path in assets.adapters.items():
        print(f"demo adapter {name}: {path}")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from serving.config import load_settings

    settings = load_settings(args.config)
    settings.check_files()
    print(f"{args.config}: ok ({len(settings.adapters)} adapters)")
    return 0


def _loadtest(args: argparse.Namespace) -> int:
    from loadtests.runner import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand (their modules are imported here, not at the top: see the module's docstring)."""
    from routing.cli import add_routes_command
    from serving import adapters_cli, keys_cli, metrics_relay
    from serving.config import load_settings

    parser = argparse.ArgumentParser(prog="loraserve", description="Multi-LoRA serving on vLLM.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the OpenAI-compatible server")
    serve.add_argument("--config", type=Path, required=True, help="YAML config file")
    serve.add_argument("--host", help="overrides server.host")
    serve.add_argument("--port", type=int, help="overrides server.port")
    serve.set_defaults(handler=_serve)

    demo = commands.add_parser("demo-assets", help="build the tiny demo base model and adapters locally")
    demo.add_argument("--root", type=Path, default=DEFAULT_DEMO_ROOT, help="output directory (default: .demo)")
    demo.add_argument("--force", action="store_true", help="rebuild even if the assets are up to date")
    demo.set_defaults(handler=_demo_assets)

    check = commands.add_parser("check-config", help="validate a config file and the paths it names")
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(handler=_check_config)

    keys_cli.add_parser(commands)
    adapters_cli.add_parser(commands)
    metrics_relay.add_parser(commands)
    add_routes_command(commands, lambda path: load_settings(path).routing)

    from loadtests.runner import add_arguments as add_loadtest_arguments

    loadtest = commands.add_parser("loadtest", help="run the locust load test headless and summarise it")
    add_loadtest_arguments(loadtest)
    loadtest.set_defaults(handler=_loadtest)
    return parser


def main(argv: list[str] | None = None) -> int:
    from serving.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as e:
        print(f"loraserve: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
