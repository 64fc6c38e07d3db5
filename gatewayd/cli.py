"""Command line: ``gatewayd run | check | demo | --version`` (SPEC section 1).

Exit codes: 0 clean stop, 1 configuration error at start (or a listener that
cannot be bound), 2 usage error. Logging handlers are set up here and nowhere
else; logs go to stderr (journald under systemd).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from gatewayd import __version__
from gatewayd import log as gatewayd_log
from gatewayd.config import Config, default_config_path, load, summary
from gatewayd.errors import ConfigErrors
from gatewayd.server import Gateway, Generation

logger = logging.getLogger("gatewayd.cli")

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatewayd",
        description="TLS-terminating WebSocket gateway daemon.",
    )
    parser.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    config_help = "configuration file (default: $GATEWAYD_CONFIG, else /etc/gatewayd/gatewayd.toml)"
    run = commands.add_parser("run", help="run in the foreground, logging to stderr")
    run.add_argument("-c", "--config", metavar="FILE", help=config_help)
    check = commands.add_parser("check", help="validate the configuration (like nginx -t)")
    check.add_argument("-c", "--config", metavar="FILE", help=config_help)
    demo = commands.add_parser(
        "demo", help="zero-setup demo on localhost: dev certificate + built-in echo backend"
    )
    demo.add_argument("--port", type=int, default=8443, help="gateway port (default 8443)")
    demo.add_argument(
        "--dir",
        metavar="DIR",
        help="where the dev CA, certificate and demo config live "
        "(default: $XDG_STATE_HOME/gatewayd/demo or ~/.local/state/gatewayd/demo)",
    )
    return parser


def load_generation(path: str) -> Generation:
    """Load and fully validate ``path``: schema, then certificates (raises ConfigErrors)."""
    config = load(path)
    return Generation.build(config)


def _print_errors(errors: ConfigErrors) -> None:
    print(f"gatewayd: {errors}", file=sys.stderr)


def cmd_check(path: str) -> int:
    try:
        generation = load_generation(path)
    except ConfigErrors as errors:
        _print_errors(errors)
        print(f"gatewayd: configuration file {path} test failed", file=sys.stderr)
        return EXIT_CONFIG
    print(summary(generation.config))
    print(f"gatewayd: configuration file {path} test is successful")
    return EXIT_OK


async def serve_until_signal(gateway: Gateway) -> None:
    """Serve ``gateway`` until SIGTERM or SIGINT, then drain and return."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve)

            async def watch() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        logger.warning(
                            "SIGHUP received: this version cannot reload; "
                            "configuration unchanged (restart to apply changes)"
                        )
                        continue
                    logger.info("%s received: shutting down", signal.Signals(signum).name)
                    gateway.shutdown()
                    return

            nursery.start_soon(watch)


def run_config(config: Config, generation: Generation | None = None) -> int:
    """Run the gateway for ``config`` in the foreground; returns the exit code."""
    gatewayd_log.setup(config.log.level, config.log.format)
    try:
        generation = generation or Generation.build(config)
    except ConfigErrors as errors:
        _print_errors(errors)
        return EXIT_CONFIG
    gateway = Gateway(config, generation=generation)

    async def main() -> int:
        try:
            await gateway.bind()
        except OSError as exc:
            logger.error("%s", exc.strerror or exc)
            return EXIT_CONFIG
        await serve_until_signal(gateway)
        return EXIT_OK

    return trio.run(main)


def cmd_run(path: str) -> int:
    try:
        generation = load_generation(path)
    except ConfigErrors as errors:
        _print_errors(errors)
        return EXIT_CONFIG
    return run_config(generation.config, generation)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return cmd_check(args.config or default_config_path())
    if args.command == "run":
        return cmd_run(args.config or default_config_path())
    if args.command == "demo":
        from gatewayd.demo import run_demo

        return run_demo(port=args.port, directory=Path(args.dir) if args.dir else None)
    return EXIT_USAGE  # pragma: no cover - argparse enforces a command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
