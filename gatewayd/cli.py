"""Command line: ``gatewayd run | check | demo | proxy | install-systemd | --version`` (SPEC section 1).

Exit codes: 0 clean stop, 1 configuration error at start (or a listener that
cannot be bound), 2 usage error. Logging handlers are set up here and nowhere
else; logs go to stderr (journald under systemd).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import shlex
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import trio

from gatewayd import __version__
from gatewayd import log as gatewayd_log
from gatewayd.acme.manager import acme_warnings, host_reports
from gatewayd.certinfo import warnings as certificate_warnings
from gatewayd.config import Config, default_config_path, load, summary
from gatewayd.control import control_loop
from gatewayd.errors import ConfigErrors
from gatewayd.notify import InheritedSocket, Notifier, listen_fds
from gatewayd.server import Gateway, Generation, ReloadAbandoned

logger = logging.getLogger("gatewayd.cli")

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2

#: Seconds between STATUS= refreshes sent to systemd.
STATUS_INTERVAL = 5.0


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
    check.add_argument(
        "-q", "--quiet", action="store_true", help="print only errors and warnings (like nginx -q)"
    )
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
    proxy = commands.add_parser(
        "proxy",
        help="proxy one address to a backend without a configuration file (like caddy reverse-proxy)",
        description="Listen on --from and proxy every path to --to, through the same configuration "
        "a file would give (--print-config shows it).",
    )
    proxy.add_argument(
        "--from", dest="from_", metavar="ADDR", required=True,
        help="[ws://|wss://][HOST][:PORT]: :8443, 127.0.0.1:8443, [::1]:8443, chat.example.com (wss:// "
        "and port 443 by default; ws:// for plain)",
    )
    proxy.add_argument(
        "--to", metavar="URL", action="append", required=True,
        help="backend: ws://, wss://, unix:, tcp:// URL or HOST:PORT; repeat to balance over several",
    )
    proxy.add_argument("--cert", metavar="FILE", help="PEM certificate chain (with --key)")
    proxy.add_argument("--key", metavar="FILE", help="PEM private key (with --cert)")
    proxy.add_argument(
        "--self-signed", metavar="NAME",
        help="make (once) a development CA and a certificate for NAME, and print how to trust it",
    )
    proxy.add_argument(
        "--dir", metavar="DIR",
        help="where --self-signed keeps its CA and certificate (default: $XDG_STATE_HOME/gatewayd/proxy)",
    )
    proxy.add_argument("--admin", metavar="ADDR", help="also serve /healthz, /readyz and /metrics on ADDR")
    proxy.add_argument(
        "--print-config", action="store_true", help="print the equivalent configuration file and exit"
    )
    install = commands.add_parser(
        "install-systemd",
        help="install the systemd units and the sysusers/tmpfiles snippets shipped with gatewayd",
        description="Copy gatewayd.service, gatewayd.socket and the sysusers/tmpfiles snippets "
        "into /etc (or PREFIX), the units pointed at this installation's gatewayd.",
    )
    install.add_argument("--prefix", default="/", help="install under this root (a package build root; default /)")
    install.add_argument(
        "--usr",
        action="store_true",
        help="package layout: /usr/lib/systemd/system, /usr/lib/sysusers.d, /usr/lib/tmpfiles.d",
    )
    install.add_argument(
        "--program", metavar="PATH", help="the gatewayd the units run (default: this installation's)"
    )
    install.add_argument(
        "--certbot-hook", action="store_true", help="also install the certbot deploy hook (docs/deploy.md)"
    )
    install.add_argument("--force", action="store_true", help="replace files that differ from the shipped ones")
    install.add_argument("--dry-run", action="store_true", help="print what would be installed, change nothing")
    return parser


def load_generation(path: str) -> Generation:
    """Load and fully validate ``path``: schema, then certificates (raises ConfigErrors)."""
    config = load(path)
    return Generation.build(config)


def _print_errors(errors: ConfigErrors) -> None:
    print(f"gatewayd: {errors}", file=sys.stderr)


def cmd_check(path: str, quiet: bool = False) -> int:
    try:
        generation = load_generation(path)
    except ConfigErrors as errors:
        _print_errors(errors)
        print(f"gatewayd: configuration file {path} test failed", file=sys.stderr)
        return EXIT_CONFIG
    now = datetime.now(timezone.utc)
    if not quiet:
        print(summary(generation.config))
        for report in host_reports(generation.config, now):
            print(f"acme      {report.host.key_path} {report.name}: {report.describe(now)}")
    # Like nginx's [warn] lines: on stderr, and the file still passes (exit 0).
    warnings = [str(warning) for warning in generation.config.warnings]
    warnings += certificate_warnings(generation.certificates, now)
    warnings += acme_warnings(generation.config)
    for warning in warnings:
        print(f"gatewayd: warning: {warning}", file=sys.stderr)
    if not quiet:
        print(f"gatewayd: configuration file {path} test is successful")
    return EXIT_OK


def _status(gateway: Gateway) -> str:
    listeners = ", ".join(
        (f"[{h}]:{p}" if ":" in h else f"{h}:{p}") for _, (h, p) in gateway.listen_addresses
    )
    admin = gateway.admin_address
    admin_text = ""
    if admin is not None:
        admin_text = f"; admin on {f'[{admin[0]}]' if ':' in admin[0] else admin[0]}:{admin[1]}"
    return (
        f"generation {gateway.generation.number}: {len(gateway.config.hosts)} host(s) "
        f"on {listeners}{admin_text}; {gateway.active_connections} connection(s)"
    )


def _log_reload_errors(errors: ConfigErrors, generation: int) -> None:
    for error in errors.errors:
        logger.error("reload: %s", error)
    logger.error(
        "reload failed (%d error(s)): still serving generation %d, unchanged",
        len(errors.errors),
        generation,
    )


async def reload_from_file(gateway: Gateway, path: str, swap_lock: trio.Lock | None = None) -> bool:
    """Re-read ``path`` and swap to it; on any error log every error and change nothing.

    The swap runs under ``swap_lock``: whoever calls ``gateway.shutdown()``
    under the same lock never lands in the middle of a swap (which would bind
    and start new listeners after the drain began). A reload that finds the
    gateway shutting down is abandoned.

    Every attempt is counted in the gateway's metrics: a file that does not
    load here, everything else by :meth:`Gateway.reload`.
    """
    old = gateway.generation.number
    try:
        # Reading the file may block (NFS, a FIFO): a shutdown does not wait for it.
        config = await trio.to_thread.run_sync(load, path, abandon_on_cancel=True)
    except ConfigErrors as errors:
        gateway.metrics.reload_failed()
        _log_reload_errors(errors, old)
        return False
    try:
        async with swap_lock or trio.Lock():
            if gateway.shutting_down:
                logger.warning("reload abandoned: shutting down (generation %d unchanged)", old)
                return False
            result = await gateway.reload(config)
    except ConfigErrors as errors:
        _log_reload_errors(errors, old)
        return False
    except OSError as exc:
        logger.error("reload failed: %s: still serving generation %d, unchanged", exc.strerror or exc, old)
        return False
    except ReloadAbandoned:
        logger.warning("reload abandoned: shutting down (generation %d unchanged)", old)
        return False
    gatewayd_log.setup(config.log.level, config.log.format)
    logger.info("reload succeeded: generation %d -> %d: %s", old, result.generation, result.describe())
    return True


class _SingleProcess:
    """One process's :class:`Gateway` as the control loop sees it (gatewayd.control)."""

    def __init__(self, gateway: Gateway, config_path: str | None) -> None:
        self.gateway = gateway
        self.config_path = config_path
        # Held by a reload's swap: a shutdown never lands in the middle of one.
        self.swap_lock = trio.Lock()

    def status(self) -> str:
        return _status(self.gateway)

    async def reload(self) -> bool:
        assert self.config_path is not None  # the loop does not reload without a file
        return await reload_from_file(self.gateway, self.config_path, self.swap_lock)

    async def shutdown(self, signal_name: str) -> None:
        logger.info("%s received: shutting down", signal_name)
        async with self.swap_lock:  # never in the middle of a reload's swap
            self.gateway.shutdown()

    async def abort(self, signal_name: str) -> None:
        logger.warning("%s received again: closing every connection now", signal_name)
        self.gateway.abort()
        await trio.lowlevel.checkpoint()


async def serve_until_signal(
    gateway: Gateway,
    config_path: str | None = None,
    notifier: Notifier | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve ``gateway`` until SIGTERM or SIGINT, then drain and return.

    SIGHUP reloads ``config_path`` (reloads are serialized: a SIGHUP during a
    reload makes one more afterwards). A second SIGTERM/SIGINT closes every
    connection at once. The signals, reloads and systemd notifications are
    :func:`gatewayd.control.control_loop`'s, shared with the supervisor of workers.
    """
    notifier = notifier or Notifier({})
    service = _SingleProcess(gateway, config_path)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(
                task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                await gateway.serve(task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(serve_then_stop)
            notifier.ready(service.status())
            if on_ready is not None:
                on_ready()  # signals are handled from here on: a Ctrl-C now stops cleanly
            nursery.start_soon(
                partial(
                    control_loop,
                    service,
                    notifier,
                    signals,
                    config_path=config_path,
                    logger=logger,
                    status_interval=STATUS_INTERVAL,
                )
            )


def match_inherited(config: Config, inherited: list[InheritedSocket]) -> dict[str, trio.socket.SocketType]:
    """Match socket-activation sockets to ``[[listener]]`` by bound address.

    An inherited socket that matches no listener is logged and left alone; a
    listener without one is bound normally.
    """
    matched: dict[str, trio.socket.SocketType] = {}
    for item in inherited:
        listener_key = None
        if item.address is not None:
            for listener in config.listeners:
                if _same_address(listener.address.host, listener.address.port, item.address):
                    listener_key = str(listener.address)
                    break
        if listener_key is None or listener_key in matched:
            logger.warning(
                "inherited socket %s (%s) matches no [[listener]] address; left alone",
                item.name,
                item.address,
            )
            continue
        matched[listener_key] = trio.socket.from_stdlib_socket(item.sock)
    return matched


def _same_address(host: str, port: int, bound: tuple[str, int]) -> bool:
    if port != bound[1]:
        return False
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    wanted = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    return ipaddress.ip_address(bound[0].split("%")[0]) in wanted


def run_config(config: Config, generation: Generation | None = None, config_path: str | None = None) -> int:
    """Run the gateway for ``config`` in the foreground; returns the exit code."""
    gatewayd_log.setup(config.log.level, config.log.format)
    try:
        generation = generation or Generation.build(config)
    except ConfigErrors as errors:
        _print_errors(errors)
        return EXIT_CONFIG
    notifier = Notifier()
    inherited = match_inherited(config, listen_fds())
    if config.gateway.workers > 1 and config_path is not None:
        from gatewayd.workers import run_supervisor

        try:
            return run_supervisor(config_path, notifier, inherited)
        finally:
            notifier.close()
    gateway = Gateway(config, generation=generation, inherited=inherited)

    async def main() -> int:
        try:
            await gateway.bind()
        except OSError as exc:
            logger.error("%s", exc.strerror or exc)
            return EXIT_CONFIG
        await serve_until_signal(gateway, config_path, notifier)
        return EXIT_OK

    try:
        return trio.run(main)
    finally:
        notifier.close()


def cmd_run(path: str) -> int:
    try:
        generation = load_generation(path)
    except ConfigErrors as errors:
        _print_errors(errors)
        return EXIT_CONFIG
    return run_config(generation.config, generation, path)


def cmd_proxy(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``gatewayd proxy``: build the configuration text, load it like a file, run it."""
    from gatewayd import oneline
    from gatewayd.config import loads
    from gatewayd.demo import ensure_dev_certificate, state_directory

    try:
        where = oneline.parse_from(args.from_)
        backends = [oneline.parse_to(url) for url in args.to]
        if (args.cert is None) != (args.key is None):
            raise oneline.UsageError("--cert and --key go together")
        if args.cert and args.self_signed:
            raise oneline.UsageError("--cert/--key or --self-signed, not both")
        if not where.tls and (args.cert or args.self_signed):
            raise oneline.UsageError(f"--from {args.from_} is plain ws://: no certificate is used")
    except oneline.UsageError as error:
        print(f"gatewayd proxy: {error}", file=sys.stderr)
        return EXIT_USAGE
    certificate = Path(args.cert).resolve() if args.cert else None
    private_key = Path(args.key).resolve() if args.key else None
    cert_names: list[str] = []
    ca: Path | None = None
    if args.self_signed:
        # Made here for --print-config too, so that the printed file passes `gatewayd check`.
        name = args.self_signed.lower()
        directory = Path(args.dir) if args.dir else state_directory("proxy")
        is_ip = oneline.is_ip(name)
        ca, certificate, private_key = ensure_dev_certificate(
            directory.resolve(),
            stem=name.replace("*", "_"),
            dns_names=() if is_ip else (name,),
            ip_addresses=(name,) if is_ip else (),
        )
    elif certificate is not None and certificate.is_file():
        try:
            cert_names = oneline.certificate_names(certificate)
        except ValueError:
            cert_names = []  # not PEM: the loader says so, naming the file
    names = oneline.host_names(where, args.self_signed and args.self_signed.lower(), cert_names)
    try:
        text = oneline.render(
            where, backends, certificate=certificate, private_key=private_key,
            names=names, admin=args.admin, command=argv,
        )
    except oneline.UsageError as error:
        print(f"gatewayd proxy: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.print_config:
        print(text, end="")
        return EXIT_OK
    try:
        generation = Generation.build(loads(text, Path.cwd() / "gatewayd-proxy.toml"))
    except ConfigErrors as errors:
        print(f"gatewayd proxy: {errors}", file=sys.stderr)
        print("gatewayd proxy: the configuration it built is shown by --print-config", file=sys.stderr)
        return EXIT_CONFIG
    scheme = "wss" if where.tls else "ws"
    shown = names[0] if where.name or args.self_signed else where.address.rpartition(":")[0]
    shown = "localhost" if shown in ("0.0.0.0", "[::]") else shown
    port = "" if where.port == (443 if where.tls else 80) else f":{where.port}"
    print(f"gatewayd proxy: {scheme}://{shown}{port}/ -> {', '.join(backends)}", file=sys.stderr)
    if ca is not None:
        print(
            f"gatewayd proxy: self-signed for {names[0]}: trust the dev CA {ca}, e.g.\n"
            f"  python -m gatewayd.client {scheme}://{names[0]}{port}/ --cafile {shlex.quote(str(ca))} hello",
            file=sys.stderr,
        )
    return run_config(generation.config, generation)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command == "proxy":
        return cmd_proxy(args, argv)
    if args.command == "check":
        return cmd_check(args.config or default_config_path(), args.quiet)
    if args.command == "run":
        return cmd_run(args.config or default_config_path())
    if args.command == "demo":
        from gatewayd.demo import run_demo

        return run_demo(port=args.port, directory=Path(args.dir) if args.dir else None)
    if args.command == "install-systemd":
        from gatewayd.install import install_systemd

        return install_systemd(
            args.prefix,
            usr=args.usr,
            program=args.program,
            certbot_hook=args.certbot_hook,
            force=args.force,
            dry_run=args.dry_run,
        )
    return EXIT_USAGE  # pragma: no cover - argparse enforces a command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
