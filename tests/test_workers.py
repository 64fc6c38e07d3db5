"""``[gateway] workers = 2``: one supervisor, two worker processes on the same listeners.

Real processes, as in test_service.py: ``python -m gatewayd run`` as a child, trio
clients and a trio-websocket echo backend in this process, real signals.

Which worker serves a connection is up to the kernel (both accept on the same
socket). To address one worker, the test pauses the other with SIGSTOP: a stopped
process cannot accept, so every new connection goes to the running one. The
observable is the access line's logger, ``gatewayd.access[worker N]``. Every
paused worker is resumed, and every worker killed, whatever happens.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import trio

from gatewayd.workers import merge_metrics
from harness import echo_backend
from test_cli import free_port
from test_service import (
    Pki,
    Service,
    child_environment,
    config,
    notify_socket,
    open_websocket,
    pki,  # noqa: F401  (fixture)
    refused,
    running,
    status_of,
)

SERVING = r"2 workers serving"
STARTED = r"worker (\d+) started \(pid (\d+)\)"


def workers_config(echo_port: int, *, routes: tuple[str, ...] = ("/echo",), admin: int | None = None) -> str:
    text = config(echo_port, routes=routes).replace("[gateway]\n", "[gateway]\nworkers = 2\n", 1)
    if admin is not None:
        text += f'\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
    return text


def worker_pids(service: Service) -> dict[int, int]:
    """The pid now running in each worker slot (the latest "started" line)."""
    return {int(index): int(pid) for index, pid in re.findall(STARTED, service.log)}


def _stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped now (SIGSTOP takes effect when it is next scheduled)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] in ("T", "t")


def _holds_a_lock(pid: int) -> bool:
    """Whether ``pid`` holds a POSIX record lock: the shared limits table's (``lockf``).

    Only POSIX locks: the ACME leader's ``flock`` is held for as long as it
    leads, and blocks no worker serving connections.
    """
    with open("/proc/locks") as locks:
        # "1: POSIX  ADVISORY  WRITE 1234 00:01:5678 0 EOF"; waiters have "->" after the number.
        return any(fields[1:2] == ["POSIX"] and fields[4:5] == [str(pid)] for fields in (line.split() for line in locks))


def _pause(pid: int) -> None:
    """SIGSTOP ``pid`` at a point where it blocks nobody, and only return once it is stopped.

    Stopped while it held the limits table's lock (a few microseconds around
    each accept and close), a worker would block the one left serving, and a
    connection made before the stop took effect could be accepted by it and
    never answered: both were a test hanging to its timeout, not a gateway bug.
    """
    deadline = time.monotonic() + 10.0
    while True:
        os.kill(pid, signal.SIGSTOP)
        while not _stopped(pid):
            assert time.monotonic() < deadline, f"worker {pid} did not stop"
            time.sleep(0.001)
        if not _holds_a_lock(pid):
            return
        os.kill(pid, signal.SIGCONT)
        assert time.monotonic() < deadline, f"worker {pid} kept holding a lock"
        time.sleep(0.001)


@contextmanager
def only(service: Service, index: int) -> Iterator[None]:
    """Pause every worker but ``index`` (SIGSTOP), resume them on the way out."""
    paused = [pid for slot, pid in worker_pids(service).items() if slot != index]
    try:
        for pid in paused:
            _pause(pid)
        yield
    finally:
        for pid in paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


@asynccontextmanager
async def supervised(tmp_path: Path, text: str, **kwargs: object) -> AsyncIterator[Service]:
    """A ``workers = 2`` gatewayd, once both workers serve; its workers die with the test."""
    async with running(tmp_path, text, **kwargs) as service:  # type: ignore[arg-type]
        try:
            await service.wait_log(SERVING)
            yield service
        finally:
            for pid in worker_pids(service).values():
                try:
                    os.kill(pid, signal.SIGCONT)
                    if service.alive is False:
                        os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def served_by(service: Service, index: int, path: str, since: int = 0) -> bool:
    return re.search(
        rf"gatewayd\.access\[worker {index}\]: .*path={re.escape(path)} ", service.log[since:]
    ) is not None


async def test_two_workers_serve_and_share_the_metrics(tmp_path: Path, pki: Pki) -> None:
    admin = free_port()
    with trio.fail_after(40):
        async with echo_backend() as echo_port, supervised(
            tmp_path, workers_config(echo_port, admin=admin)
        ) as service:
            pids = worker_pids(service)
            assert sorted(pids) == [1, 2] and len(set(pids.values())) == 2, service.log
            for index in (1, 2):
                with only(service, index):
                    mark = len(service.log)
                    assert await status_of(service.port, pki.context) == 101
                    await service.wait_log(rf"gatewayd\.access\[worker {index}\]", since=mark)
                    assert not served_by(service, 3 - index, "/echo", mark)
            # The supervisor serves [admin]: every worker's metrics, labelled.
            stream = await trio.open_tcp_stream("127.0.0.1", admin)
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
            await stream.aclose()
            text = answer.decode()
            assert text.startswith("HTTP/1.1 200 "), text[:200]
            for index in (1, 2):
                assert re.search(rf'gatewayd_connections_accepted_total\{{worker="{index}"\}} [1-9]', text), text
            assert text.count("# TYPE gatewayd_connections_accepted_total counter") == 1
            # Each process's own memory, fds and CPU: both workers' and the supervisor's, one family.
            memory = dict(re.findall(r'process_resident_memory_bytes\{worker="(\w+)"\} ([0-9.e+]+)', text))
            assert set(memory) == {"1", "2", "supervisor"}, text
            assert all(float(v) > 2**20 for v in memory.values())
            assert text.count("# TYPE process_resident_memory_bytes gauge") == 1
            assert re.search(r'gatewayd_build_info\{worker="supervisor",openssl="OpenSSL [^"]+",python="[^"]+",version="[^"]+"\} 1.0', text), text


async def test_a_killed_worker_is_replaced(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(40):
        async with echo_backend() as echo_port, supervised(tmp_path, workers_config(echo_port)) as service:
            with only(service, 2):
                survivor = await open_websocket(service.port, pki.context)
            killed = worker_pids(service)[1]
            mark = len(service.log)
            os.kill(killed, signal.SIGKILL)
            await service.wait_log(
                rf"worker 1 \(pid {killed}\) died \(killed by SIGKILL\) after [\d.]+s; replacing it in 0\.1s",
                since=mark,
            )
            await service.wait_log(r"gatewayd\.server\[worker 1\]: listening on", since=mark)
            replacement = worker_pids(service)[1]
            assert replacement != killed
            with only(service, 1):
                mark = len(service.log)
                assert await status_of(service.port, pki.context) == 101
                await service.wait_log(r"gatewayd\.access\[worker 1\]", since=mark)
            # Worker 2 and its connection never noticed.
            assert await survivor.echo(b"still here") == b"still here"
            await survivor.aclose()
            assert service.alive


async def test_sighup_reaches_every_worker_and_a_bad_file_none(tmp_path: Path, pki: Pki) -> None:
    address = str(tmp_path / "notify.sock")
    with trio.fail_after(40):
        async with echo_backend() as echo_port, notify_socket(address) as notifications:
            env = child_environment(NOTIFY_SOCKET=address)
            async with supervised(tmp_path, workers_config(echo_port), env=env) as service:
                await notifications.wait_for(["READY"])
                assert notifications.received[-1][1]["STATUS"].endswith("2/2 worker(s)")

                broken = workers_config(echo_port, routes=("/echo", "/added")).replace(
                    "shutdown_timeout = 20.0", "shutdown_timeout = = 20.0"
                )
                logged = await service.reload(broken)
                assert "ERROR gatewayd.workers: reload: " in logged, logged
                assert "reload failed (1 error(s)): still serving generation 1, unchanged" in logged
                assert "[worker" not in logged, logged  # no worker heard of it
                await notifications.wait_for(["READY", "RELOADING", "READY"])

                logged = await service.reload(workers_config(echo_port, routes=("/echo", "/added")))
                assert re.search(
                    r"reload succeeded: generation 1 -> 2: routes added: localhost/added "
                    r"\(2 worker\(s\) swapped\)",
                    logged,
                ), logged
                await notifications.wait_for(["READY", "RELOADING", "READY", "RELOADING", "READY"])
                for index in (1, 2):
                    assert f"gatewayd.workers[worker {index}]: generation 1 -> 2" in service.log
                    with only(service, index):
                        mark = len(service.log)
                        assert await status_of(service.port, pki.context, "/added") == 101
                        await service.wait_log(rf"gatewayd\.access\[worker {index}\]", since=mark)


async def test_a_listener_added_by_reload_is_served_by_every_worker(tmp_path: Path, pki: Pki) -> None:
    extra = free_port()
    with trio.fail_after(40):
        async with echo_backend() as echo_port, supervised(tmp_path, workers_config(echo_port)) as service:
            text = workers_config(echo_port).replace(
                '[[listener]]\naddress = "127.0.0.1:0"\n',
                f'[[listener]]\naddress = "127.0.0.1:0"\n\n[[listener]]\naddress = "127.0.0.1:{extra}"\n',
            )
            logged = await service.reload(text)
            assert f"listeners added: 127.0.0.1:{extra}" in logged, logged
            for index in (1, 2):
                with only(service, index):
                    assert await status_of(extra, pki.context) == 101
            logged = await service.reload(workers_config(echo_port))
            assert f"listeners removed: 127.0.0.1:{extra}" in logged, logged
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.1", extra)) != 0  # nobody holds it any more
            assert await status_of(service.port, pki.context) == 101


async def test_sigterm_drains_every_worker_then_exits_0(tmp_path: Path, pki: Pki) -> None:
    address = str(tmp_path / "notify.sock")
    with trio.fail_after(40):
        async with echo_backend() as echo_port, notify_socket(address) as notifications:
            env = child_environment(NOTIFY_SOCKET=address)
            async with supervised(tmp_path, workers_config(echo_port), env=env) as service:
                sockets = {}
                for index in (1, 2):
                    with only(service, index):
                        sockets[index] = await open_websocket(service.port, pki.context)
                mark = len(service.log)
                service.signal(signal.SIGTERM)
                for index in (1, 2):
                    await service.wait_log(
                        rf"gatewayd\.server\[worker {index}\]: shutting down: no longer accepting; "
                        r"1 connection\(s\) may drain",
                        since=mark,
                    )
                assert await refused(service.port, pki.context)
                for index, ws in sockets.items():
                    assert await ws.echo(b"draining %d" % index) == b"draining %d" % index
                assert service.alive
                for ws in sockets.values():
                    await ws.aclose()
                code = await service.wait_exit(5.0)
                await notifications.wait_for(["READY", "STOPPING"])
    assert code == 0, service.child.describe()
    assert "closing" not in service.log[mark:], service.log
    assert re.search(r"worker 1 \(pid \d+\) exited \(exit code 0\)", service.log)
    assert re.search(r"worker 2 \(pid \d+\) exited \(exit code 0\)", service.log)


async def test_workers_stay_up_and_stop_when_the_supervisor_is_killed(tmp_path: Path, pki: Pki) -> None:
    """Workers outlive the thread that started them (trio's spawn thread ends after 10 s
    idle: a PR_SET_PDEATHSIG tied to it once stopped every worker at 10 s), and a
    supervisor killed outright leaves no worker behind (its control channel closes)."""
    with trio.fail_after(40):
        async with echo_backend() as echo_port, supervised(tmp_path, workers_config(echo_port)) as service:
            pids = worker_pids(service)
            await trio.sleep(11.5)
            assert "died" not in service.log and "shutting down" not in service.log, service.log
            assert worker_pids(service) == pids
            assert await status_of(service.port, pki.context) == 101
            mark = len(service.log)
            service.child.process.kill()
            # (The supervisor is dead: poll the log file ourselves, wait_log stops at its exit.)
            with trio.move_on_after(10):
                while not all(
                    f"gatewayd.workers[worker {index}]: the supervisor is gone: shutting down"
                    in service.log[mark:]
                    for index in (1, 2)
                ):
                    await trio.sleep(0.05)
            assert service.log[mark:].count("the supervisor is gone: shutting down") == 2, service.log
            with trio.move_on_after(10):
                while any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in pids.values()):
                    await trio.sleep(0.05)
            assert not any(_alive(pid) for pid in pids.values())


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, reaped by init later, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_merge_metrics_keeps_each_family_together() -> None:
    one = "# HELP a_total A.\n# TYPE a_total counter\na_total 1.0\n# HELP b B.\n# TYPE b gauge\nb{x=\"1\"} 2.0\n"
    two = "# HELP a_total A.\n# TYPE a_total counter\na_total 3.0\n# HELP b B.\n# TYPE b gauge\nb{x=\"1\"} 4.0\n"
    assert merge_metrics({1: one, 2: two}) == (
        "# HELP a_total A.\n# TYPE a_total counter\n"
        'a_total{worker="1"} 1.0\na_total{worker="2"} 3.0\n'
        "# HELP b B.\n# TYPE b gauge\n"
        'b{worker="1",x="1"} 2.0\nb{worker="2",x="1"} 4.0\n'
    )
    own = "# HELP a_total A.\n# TYPE a_total counter\na_total 5.0\n# HELP c C.\n# TYPE c gauge\nc 6.0\n"
    assert merge_metrics({1: one}, supervisor=own) == (
        "# HELP a_total A.\n# TYPE a_total counter\n"
        'a_total{worker="1"} 1.0\na_total{worker="supervisor"} 5.0\n'
        "# HELP b B.\n# TYPE b gauge\n"
        'b{worker="1",x="1"} 2.0\n'
        "# HELP c C.\n# TYPE c gauge\n"
        'c{worker="supervisor"} 6.0\n'
    )
