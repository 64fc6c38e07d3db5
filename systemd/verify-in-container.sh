#!/usr/bin/env bash
# Prove systemd/* on a real systemd: boot a container (PID 1 = systemd), install gatewayd into
# /opt/gatewayd the way docs/deploy.md says, and drive the units with systemctl:
#
#   start (sysusers user, ExecStartPre check, Type=notify READY=1, sandbox + capability in force)
#   connect from the host and from inside (wss:// on port 443, ws:// and unix: backends)
#   reload: READY=1 awaited; a new route; a new listener on a privileged port; a broken file
#     (systemctl reload fails, the daemon keeps serving, both reload paths log their errors);
#     a certificate rotated by the certbot deploy hook
#   socket activation: activation on the first connection, fds matched by address (IPv4 and
#     IPv6), restarts without a refused connection, the no-capability variant of docs/deploy.md
#   watchdog: pings keep it alive; a stopped event loop is killed and restarted
#   the omissions: MemoryDenyWriteExecute=yes and DynamicUser=yes really break it
#   stop with a connection open: drains, exit 0; systemd-analyze security score
#
# Run as root from anywhere:  systemd/verify-in-container.sh   (exit 0 = everything proven)
# Needs Debian's systemd-container and debootstrap (installed with apt-get when missing; the
# container's root file system is built once with debootstrap: systemd/container.sh),
# network access for pip inside the container, and ports 443 and 444 free on the host (the
# container shares the host network). Bounded by $VERIFY_TIMEOUT seconds (default 290; the
# very first run also builds the Debian rootfs, about a minute). The container is powered off
# on exit, whatever happens; KEEP=1 leaves it running for inspection (then run stop.sh).
# VERIFY_VARIANT=bookworm (systemd 252, default) | trixie (257).
set -euo pipefail

REPO=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
export VERIFY_CONTAINER=${VERIFY_CONTAINER:-gatewayd-verify}
export VERIFY_BIND_RO=$REPO            # the checkout, read-only at the same path inside
# shellcheck source=container.sh
source "$REPO/systemd/container.sh"
LIMIT=${VERIFY_TIMEOUT:-290}

# The whole run under one bound: timeout(1) signals our process group, the trap cleans up.
if [ -z "${_VERIFY_BOUNDED:-}" ]; then
    export _VERIFY_BOUNDED=1
    exec timeout --kill-after=30 "$LIMIT" bash "$(readlink -f "$0")" "$@"
fi

[ "$(id -u)" = 0 ] || { echo "verify: must run as root (systemd-nspawn)" >&2; exit 1; }

CA=/root/ca/ca.pem                        # inside: the dev CA that signs the localhost certificate
PY=/opt/gatewayd/bin/python
HOSTTMP=$(mktemp -d)
T0=$SECONDS
PASSED=0
SUMMARY=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [ $rc -ne 0 ] && [ -n "${FAILED:-}" ]; then
        echo "verify: the gatewayd journal at the failure:" >&2
        container_run timeout 10 journalctl -u gatewayd -o cat --no-pager -n 40 >&2 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        echo "verify: KEEP=1: container '$VERIFY_CONTAINER' left running; stop it with: $(keep_hint)" >&2
    else
        container_stop >/dev/null 2>&1 || true
    fi
    rm -rf "$HOSTTMP"
    if [ $rc -eq 124 ]; then echo "verify: FAILED: over the ${LIMIT}s bound" >&2; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 124' TERM
trap 'exit 130' INT HUP

step() { printf '\n== %s  (%ss)\n' "$*" $((SECONDS - T0)); }
ok() { PASSED=$((PASSED + 1)); printf '   ok  %s\n' "$*"; }
fail() { FAILED=1; printf '   FAIL  %s\n' "$*" >&2; exit 1; }
note() { SUMMARY+=("$*"); printf '   --  %s\n' "$*"; }

# Run in the container (bounded).  cin CMD...  |  cin bash -se <<'EOF' ... EOF
cin() { container_run timeout "${STEP_TIMEOUT:-60}" "$@"; }
keep_hint() { echo "bash -c 'VERIFY_CONTAINER=$VERIFY_CONTAINER; source $REPO/systemd/container.sh; container_stop'"; }

# A WebSocket round trip from inside: ws URL, message [, extra client options]; echo must match.
roundtrip() {
    local url=$1 msg=$2 out
    shift 2
    out=$(cin "$PY" -m gatewayd.client --timeout 5 "$url" --cafile "$CA" "$@" "$msg" 2>&1) \
        || fail "$url: $out"
    [ "$out" = "$msg" ] || fail "$url: sent '$msg', got '$out'"
}

# The handshake status from inside (for the negative cases): prints e.g. 404.
status_of() {
    cin "$PY" - "$1" "$CA" <<'EOF'
import ssl, sys, trio
from trio_websocket import HandshakeError, open_websocket_url
async def main():
    ctx = ssl.create_default_context(cafile=sys.argv[2])
    try:
        with trio.fail_after(5):
            async with open_websocket_url(sys.argv[1], ssl_context=ctx):
                print(101)
    except HandshakeError as exc:
        print(getattr(exc, "status_code", None) or f"error: {exc!r}")
    except OSError as exc:
        print(f"error: {exc!r}")
trio.run(main)
EOF
}

# Journal positions: mark, then since_mark shows only what gatewayd.service logged after it.
# The cursor must be one of the unit's own entries: with a cursor from another unit,
# `journalctl -u X --after-cursor=C` (systemd 252) skips the first matching entry after C.
mark() {
    CURSOR=$(cin journalctl -u gatewayd -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p')
    [ -n "$CURSOR" ] || fail "no journal cursor"
}
since_mark() { cin journalctl -u gatewayd --after-cursor="$CURSOR" -o cat --no-pager; }
# Wait (up to 10 s) until a line matching the extended regex appears after the mark.
expect_log() {
    local i out
    for i in $(seq 50); do
        out=$(since_mark)
        grep -Eq -- "$1" <<<"$out" && return 0
        sleep 0.2
    done
    fail "journal: no line matching /$1/ (after the mark)"
}
prop() { cin systemctl show gatewayd.service -P "$1"; }
generation() { prop StatusText | sed -n 's/^generation \([0-9]*\):.*/\1/p'; }

# Rewrite the config inside; $1 = extra [[listener]] lines, $2 = extra routes.
write_config() {
    cin bash -se <<EOF
cat > /etc/gatewayd/gatewayd.toml.new <<'TOML'
[gateway]
shutdown_timeout = 3.0

[[listener]]
address = "0.0.0.0:443"
$1
[[host]]
names = ["localhost"]
certificate = "certs/localhost/fullchain.pem"
private_key = "certs/localhost/privkey.pem"
default = true

[[host.route]]
path = "/echo"
backend = "ws://localhost:9000/"
$2
TOML
chown root:gatewayd /etc/gatewayd/gatewayd.toml.new
chmod 0640 /etc/gatewayd/gatewayd.toml.new
mv /etc/gatewayd/gatewayd.toml.new /etc/gatewayd/gatewayd.toml
EOF
}

step "preflight"
container_stop >/dev/null 2>&1 || true     # a container of ours left running by KEEP=1
for port in 443 444; do
    if [ -n "$(ss -Hltn "sport = :$port")" ]; then
        fail "port $port is already listening on this host (the container shares its network)"
    fi
done
ok "ports 443 and 444 free on the host"

step "boot a real systemd ($VERIFY_CONTAINER, $VERIFY_VARIANT)"
container_boot || fail "container_boot"
SYSTEMD_VERSION=$(cin systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p')
ok "systemd $SYSTEMD_VERSION is PID 1 of the container"

step "install gatewayd into /opt/gatewayd (docs/deploy.md)"
# The checkout is mounted read-only and pip builds in the source tree, so build from a copy.
STEP_TIMEOUT=180 cin bash -se <<EOF || fail "pip install"
mkdir -p /tmp/src
tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude='*.egg-info' --exclude='*cache*' \
    --exclude=./build --exclude=./dist -cf - . | tar -C /tmp/src -xf -
python3 -m venv /opt/gatewayd
/opt/gatewayd/bin/pip install -q --disable-pip-version-check /tmp/src
EOF
ok "$(cin /opt/gatewayd/bin/gatewayd --version) in /opt/gatewayd"
cin bash -se <<EOF || fail "installing the units"
/opt/gatewayd/bin/gatewayd install-systemd --certbot-hook   # from the installed package data
systemd-sysusers gatewayd.conf
systemd-tmpfiles --create gatewayd.conf
systemctl daemon-reload
for f in gatewayd.service gatewayd.socket; do cmp "$REPO/systemd/\$f" /etc/systemd/system/\$f; done
cmp "$REPO/systemd/gatewayd.sysusers" /etc/sysusers.d/gatewayd.conf
cmp "$REPO/systemd/gatewayd.tmpfiles" /etc/tmpfiles.d/gatewayd.conf
EOF
[ "$(cin stat -c '%U:%G %a' /etc/gatewayd /etc/gatewayd/certs | sort -u)" = "root:gatewayd 750" ] \
    || fail "/etc/gatewayd permissions: $(cin stat -c '%n %U:%G %a' /etc/gatewayd /etc/gatewayd/certs)"
ok "sysusers: $(cin getent passwd gatewayd); tmpfiles: /etc/gatewayd{,/certs} root:gatewayd 0750"
out=$(cin systemd-analyze verify /etc/systemd/system/gatewayd.service /etc/systemd/system/gatewayd.socket 2>&1) \
    || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify has warnings: $out"
ok "systemd-analyze verify: no warnings for gatewayd.service, gatewayd.socket"

step "certificate (via the certbot deploy hook), configuration, echo backends"
cin bash -se <<EOF || fail "setup"
# This container has no /etc/hosts; the config's ws://localhost backend needs one.
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost\n' > /etc/hosts
# A dev CA + localhost certificate (gatewayd's demo code), laid out as certbot does.
$PY -c 'import pathlib, gatewayd.demo as d; d.ensure_dev_certificate(pathlib.Path("/root/ca"))'
install -d -m 0700 /etc/letsencrypt/live/localhost
install -m 0600 /root/ca/localhost.pem /etc/letsencrypt/live/localhost/fullchain.pem
install -m 0600 /root/ca/localhost.key /etc/letsencrypt/live/localhost/privkey.pem
RENEWED_LINEAGE=/etc/letsencrypt/live/localhost /etc/letsencrypt/renewal-hooks/deploy/gatewayd
# Echo backends: TCP 127.0.0.1:9000 and a unix socket in /run (the service cannot see /tmp).
cat > /usr/local/bin/echo-backend <<'PY'
#!/opt/gatewayd/bin/python
import os, sys, trio
from trio_websocket import ConnectionClosed, wrap_server_stream
async def echo(stream):
    async with trio.open_nursery() as nursery:
        ws = await (await wrap_server_stream(nursery, stream)).accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except ConnectionClosed:
            pass
async def main(where):
    if where.startswith("/"):
        sock = trio.socket.socket(trio.socket.AF_UNIX)
        await sock.bind(where)
        os.chmod(where, 0o666)
    else:
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await sock.bind(("127.0.0.1", int(where)))
    sock.listen(128)
    await trio.serve_listeners(echo, [trio.SocketListener(sock)])
trio.run(main, sys.argv[1])
PY
chmod 0755 /usr/local/bin/echo-backend
systemd-run -q --unit=echo-tcp /usr/local/bin/echo-backend 9000
systemd-run -q --unit=echo-unix -p RuntimeDirectory=echo /usr/local/bin/echo-backend /run/echo/echo.sock
EOF
write_config "" ""
[ "$(cin stat -c '%U:%G %a' /etc/gatewayd/certs/localhost/privkey.pem)" = "root:gatewayd 640" ] \
    || fail "the hook's privkey.pem is not root:gatewayd 0640"
ok "deploy hook copied /etc/letsencrypt/live/localhost -> /etc/gatewayd/certs/localhost (0640 root:gatewayd)"

step "systemctl start gatewayd"
cin systemctl start gatewayd.service || fail "systemctl start"
[ "$(cin systemctl is-active gatewayd.service)" = active ] || fail "not active after start"
[ "$(generation)" = 1 ] || fail "StatusText after READY=1: '$(prop StatusText)'"
ok "active: ExecStartPre check passed, READY=1 received; status: $(prop StatusText)"
PID=$(prop MainPID)
cin bash -se <<EOF || fail "process identity/sandbox"
set -e
st=/proc/$PID/status
[ "\$(stat -c %U /proc/$PID)" = gatewayd ]
grep -q '^CapEff:.*0000000000000400$' \$st      # CAP_NET_BIND_SERVICE only
grep -q '^CapBnd:.*0000000000000400$' \$st
grep -q '^NoNewPrivs:.*1$' \$st
grep -q '^Seccomp:.*2$' \$st
EOF
ok "main PID $PID runs as gatewayd, capabilities = CAP_NET_BIND_SERVICE only, NoNewPrivs, seccomp on"

step "connect"
mark
roundtrip wss://localhost/echo "hello from inside the container"
ok "inside: wss://localhost:443/echo -> ws://localhost:9000 echoed"
cin cat "$CA" > "$HOSTTMP/ca.pem"
cat > "$HOSTTMP/client.py" <<'EOF'
# A stdlib-only WebSocket client: TLS to 127.0.0.1:443, the RFC 6455 handshake, one masked frame.
import base64, hashlib, os, socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
with socket.create_connection(("127.0.0.1", 443), timeout=5) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        def read(n):
            data = b""
            while len(data) < n:
                chunk = s.recv(n - len(data))
                if not chunk:
                    raise EOFError("closed")
                data += chunk
            return data
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += read(1)
        accept = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        assert head.startswith(b"HTTP/1.1 101 "), head
        fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if line)
        fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
        assert fields[b"sec-websocket-accept"] == accept.encode(), head
        payload, mask = b"hello from the host", os.urandom(4)
        s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask
                  + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        first, length = read(2)
        assert first == 0x81 and length == len(payload), (first, length)
        print(read(length).decode())
EOF
out=$(timeout 20 python3 "$HOSTTMP/client.py" "$HOSTTMP/ca.pem" 2>&1) || fail "from the host: $out"
[ "$out" = "hello from the host" ] || fail "from the host: $out"
ok "host: stdlib client -> 127.0.0.1:443: 101 with the right Sec-WebSocket-Accept, frame echoed"
expect_log 'gatewayd.access: client=127.0.0.1:[0-9]+ sni=localhost host=localhost path=/echo .*status=101'
ok "access lines in the journal (journalctl -u gatewayd -o cat)"

step "systemctl reload"
mark
cin systemctl reload gatewayd.service || fail "systemctl reload"
# STATUS=generation N is sent with READY=1: seeing it as soon as systemctl returns shows that
# the reload job waited for READY=1 (the trailing ExecReload sleep closes systemd 252's race).
[ "$(generation)" = 2 ] || fail "right after systemctl reload: status '$(prop StatusText)' (READY=1 not awaited?)"
expect_log 'reload succeeded: generation 1 -> 2'
ok "journal: $(since_mark | grep -o 'reload succeeded.*')"
ok "systemctl reload returned after READY=1 (status already: generation 2)"

[ "$(status_of wss://localhost/added)" = 404 ] || fail "/added before the reload: not 404"
write_config "" '
[[host.route]]
path = "/added"
backend = "unix:/run/echo/echo.sock"'
mark
cin systemctl reload gatewayd.service || fail "systemctl reload (route added)"
expect_log 'reload succeeded: generation 2 -> 3: routes added: localhost/added'
roundtrip wss://localhost/added "served by the added route"
ok "route added + reload: /added 404 before, 101 after (unix: backend in /run through the sandbox)"

write_config '
[[listener]]
address = "127.0.0.1:444"' '
[[host.route]]
path = "/added"
backend = "unix:/run/echo/echo.sock"'
mark
cin systemctl reload gatewayd.service || fail "systemctl reload (listener added)"
expect_log 'listening on 127.0.0.1:444'
roundtrip wss://localhost:444/echo "on the new listener"
ok "listener 127.0.0.1:444 added by reload: bound by the running unprivileged process (ambient CAP_NET_BIND_SERVICE)"

step "a broken configuration + reload"
cin sh -c 'cp -p /etc/gatewayd/gatewayd.toml /root/good.toml && sed -i "s/^shutdown_timeout/shutdown_timout/" /etc/gatewayd/gatewayd.toml'
mark
if cin systemctl reload gatewayd.service 2>/dev/null; then fail "systemctl reload succeeded on a broken file"; fi
expect_log "gateway.shutdown_timout: unknown key \(did you mean 'shutdown_timeout'\?\)"
expect_log 'Reload failed for gatewayd.service'
[ "$(cin systemctl is-active gatewayd.service)" = active ] || fail "not active after the failed reload"
[ "$(generation)" = 4 ] || fail "generation changed: $(prop StatusText)"
roundtrip wss://localhost/added "still serving"
ok "systemctl reload exits 1, the check's error is in the journal, still active on generation 4"
mark
cin systemctl kill -s HUP --kill-who=main gatewayd.service
expect_log 'reload failed \(1 error\(s\)\): still serving generation 4, unchanged'
roundtrip wss://localhost/added "still serving after a raw SIGHUP"
ok "a raw SIGHUP (no check first): the daemon logs every error and keeps generation 4"
cin cp -p /root/good.toml /etc/gatewayd/gatewayd.toml

step "certificate rotation (certbot deploy hook -> systemctl reload)"
fingerprint() {
    cin "$PY" - "$@" <<'EOF'
import hashlib, ssl, sys
if len(sys.argv) > 1:   # the first certificate of a PEM file
    pem = open(sys.argv[1]).read().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
else:                   # the certificate the gateway serves
    pem = ssl.get_server_certificate(("127.0.0.1", 443))
print(hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest())
EOF
}
before=$(fingerprint)
cin bash -se <<EOF || fail "renewal"
rm /root/ca/localhost.pem /root/ca/localhost.key      # a new key and certificate, same CA
$PY -c 'import pathlib, gatewayd.demo as d; d.ensure_dev_certificate(pathlib.Path("/root/ca"))'
install -m 0600 /root/ca/localhost.pem /etc/letsencrypt/live/localhost/fullchain.pem
install -m 0600 /root/ca/localhost.key /etc/letsencrypt/live/localhost/privkey.pem
EOF
mark
cin env RENEWED_LINEAGE=/etc/letsencrypt/live/localhost /etc/letsencrypt/renewal-hooks/deploy/gatewayd \
    || fail "the deploy hook"
expect_log 'reload succeeded: generation 4 -> 5'
after=$(fingerprint)
[ "$after" = "$(fingerprint /root/ca/localhost.pem)" ] && [ "$after" != "$before" ] \
    || fail "served certificate $after, renewed file $(fingerprint /root/ca/localhost.pem), before $before"
roundtrip wss://localhost/echo "with the renewed certificate"
ok "served certificate changed ${before:0:12}… -> ${after:0:12}… (the renewed one) without a restart"

step "watchdog"
cin bash -se <<'EOF'
mkdir -p /run/systemd/system/gatewayd.service.d
printf '[Service]\nWatchdogSec=2s\n' > /run/systemd/system/gatewayd.service.d/verify-watchdog.conf
systemctl daemon-reload
systemctl restart gatewayd.service
EOF
t1=$(prop WatchdogTimestampMonotonic)
sleep 3
t2=$(prop WatchdogTimestampMonotonic)
[ "$(prop NRestarts)" = 0 ] && [ "$t2" -gt "$t1" ] || fail "watchdog pings: NRestarts=$(prop NRestarts) $t1 -> $t2"
ok "WatchdogSec=2s: WATCHDOG=1 pings arrive (every 1 s), no restart in 3 s"
PID=$(prop MainPID)
mark
cin kill -STOP "$PID"
expect_log 'Watchdog timeout'
for i in $(seq 50); do
    [ "$(prop NRestarts)" = 1 ] && [ "$(cin systemctl is-active gatewayd.service)" = active ] && break
    sleep 0.2
done
[ "$(prop NRestarts)" = 1 ] && [ "$(prop MainPID)" != "$PID" ] || fail "not restarted after the watchdog timeout"
roundtrip wss://localhost/echo "after the watchdog restart"
ok "event loop stopped (SIGSTOP): 'Watchdog timeout', killed, restarted by Restart=on-failure"
cin bash -se <<'EOF'
rm /run/systemd/system/gatewayd.service.d/verify-watchdog.conf
systemctl daemon-reload
EOF

step "deliberate omissions really break it"
for dropin in 'MemoryDenyWriteExecute=yes' $'DynamicUser=yes\nUser=gatewayd-dynamic\nGroup='; do
    cin bash -se <<EOF
systemctl stop gatewayd.service
printf '[Service]\n%s\n' '$dropin' > /run/systemd/system/gatewayd.service.d/verify-omitted.conf
systemctl daemon-reload
EOF
    mark
    if cin systemctl start gatewayd.service 2>/dev/null; then fail "started with $dropin"; fi
    case $dropin in
        Memory*) expect_log 'MemoryError: Cannot allocate write\+execute memory for ffi.callback' ;;
        Dynamic*) expect_log 'cannot read the configuration file: permission denied' ;;
    esac
    ok "${dropin%%$'\n'*}: start fails ($(since_mark | grep -Eo 'MemoryError: Cannot allocate write\+execute memory|permission denied' | head -1))"
done
cin bash -se <<'EOF'
systemctl stop gatewayd.service        # cancel the pending Restart=on-failure
rm /run/systemd/system/gatewayd.service.d/verify-omitted.conf
systemctl daemon-reload
systemctl reset-failed gatewayd.service 2>/dev/null || true
EOF

step "socket activation (gatewayd.socket)"
cin systemctl start gatewayd.socket || fail "systemctl start gatewayd.socket"
[ "$(cin systemctl is-active gatewayd.service)" = inactive ] || fail "service already running"
mark
roundtrip wss://localhost/echo "activated by the first connection"
expect_log 'using the inherited socket for 0.0.0.0:443 \(socket activation\)'
[ "$(cin systemctl is-active gatewayd.service)" = active ] || fail "service not active"
ok "first connection started gatewayd.service; it serves 0.0.0.0:443 on the inherited fd"
note "socket activation: $(cin sh -c "tr '\0' '\n' < /proc/$(prop MainPID)/environ | grep -E '^LISTEN_FD' | tr '\n' ' '")"

cin bash -se <<'EOF' > "$HOSTTMP/probe.out" &
# Open a WebSocket every 20 ms for 3 s while the service restarts; count the outcomes.
cat > /usr/local/bin/probe-loop <<'PY'
#!/opt/gatewayd/bin/python
import collections, ssl, sys, trio
from trio_websocket import open_websocket_url
async def main():
    ctx = ssl.create_default_context(cafile="/root/ca/ca.pem")
    counts = collections.Counter()
    async def one():
        try:
            with trio.fail_after(10):
                async with open_websocket_url("wss://localhost/echo", ssl_context=ctx) as ws:
                    await ws.send_message("x")
                    await ws.get_message()
            counts["ok"] += 1
        except Exception as exc:
            counts[type(exc).__name__] += 1
    async with trio.open_nursery() as nursery:
        for _ in range(150):
            nursery.start_soon(one)
            await trio.sleep(0.02)
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
trio.run(main)
PY
chmod 0755 /usr/local/bin/probe-loop
exec /usr/local/bin/probe-loop
EOF
probe=$!
sleep 1
cin systemctl restart gatewayd.service || fail "restart"
wait $probe || fail "probe loop"
[ "$(cat "$HOSTTMP/probe.out")" = "ok=150" ] || fail "connections during a restart: $(cat "$HOSTTMP/probe.out")"
ok "150 connections across systemctl restart: all served (the socket stays open; none refused)"

if [ -e /proc/net/if_inet6 ]; then
    write_config '
[[listener]]
address = "[::]:443"' ''
    cin bash -se <<'EOF'
systemctl stop gatewayd.socket gatewayd.service
mkdir -p /run/systemd/system/gatewayd.socket.d
printf '[Socket]\nListenStream=[::]:443\n' > /run/systemd/system/gatewayd.socket.d/verify-ipv6.conf
systemctl daemon-reload
systemctl start gatewayd.socket
EOF
    mark
    roundtrip 'wss://[::1]/echo' "over IPv6"
    roundtrip wss://127.0.0.1/echo "over IPv4"
    expect_log 'using the inherited socket for \[::\]:443'
    expect_log 'using the inherited socket for 0.0.0.0:443'
    ok "two sockets (0.0.0.0:443, [::]:443 IPv6-only) matched by address to two [[listener]]s"
    cin bash -se <<'EOF'
systemctl stop gatewayd.socket gatewayd.service
rm -r /run/systemd/system/gatewayd.socket.d
systemctl daemon-reload
EOF
    write_config "" ""
else
    note "no IPv6 on this host: the two-socket IPv6 case was not run"
fi

# docs/deploy.md: with every listener from the socket, the service needs no capability at all.
cin bash -se <<'EOF'
systemctl stop gatewayd.service
printf '[Service]\nAmbientCapabilities=\nCapabilityBoundingSet=\nPrivateUsers=yes\n' \
    > /run/systemd/system/gatewayd.service.d/socket-only.conf
systemctl daemon-reload
systemctl start gatewayd.socket
EOF
roundtrip wss://localhost/echo "no capabilities, private user namespace"
cin grep -q '^CapEff:.*0000000000000000$' /proc/"$(prop MainPID)"/status || fail "capabilities left"
SOCKET_ONLY_SCORE=$(cin systemd-analyze security gatewayd.service --no-pager | sed -n 's/.*Overall exposure level for gatewayd.service: \([0-9.]*\).*/\1/p')
ok "socket-only drop-in (no capabilities, PrivateUsers=yes) serves; exposure $SOCKET_ONLY_SCORE"
cin bash -se <<'EOF'
systemctl stop gatewayd.socket gatewayd.service
rm /run/systemd/system/gatewayd.service.d/socket-only.conf
systemctl daemon-reload
EOF

step "systemctl stop with a connection open"
cin systemctl start gatewayd.service || fail "start"
cin bash -se <<'EOF'
cat > /usr/local/bin/hold-open <<'PY'
#!/opt/gatewayd/bin/python
import ssl, trio
from trio_websocket import ConnectionClosed, open_websocket_url
async def main():
    ctx = ssl.create_default_context(cafile="/root/ca/ca.pem")
    async with open_websocket_url("wss://localhost/echo", ssl_context=ctx) as ws:
        await ws.send_message("hold")
        print("echoed", await ws.get_message(), flush=True)
        try:
            await ws.get_message()
        except ConnectionClosed as exc:
            print("closed by the gateway", exc.reason.code, flush=True)
trio.run(main)
PY
chmod 0755 /usr/local/bin/hold-open
systemd-run -q --unit=hold-open /usr/local/bin/hold-open
EOF
for i in $(seq 25); do [[ "$(cin journalctl -u hold-open -o cat)" == *"echoed hold"* ]] && break; sleep 0.2; done
mark
t=$SECONDS
cin systemctl stop --no-block gatewayd.service || fail "systemctl stop"
# STATUS=draining connections is sent with STOPPING=1.
for i in $(seq 25); do [ "$(prop StatusText)" = "draining connections" ] && break; sleep 0.1; done
[ "$(prop StatusText)" = "draining connections" ] && [ "$(prop ActiveState)" = deactivating ] \
    || fail "while stopping: $(prop ActiveState), status '$(prop StatusText)'"
for i in $(seq 100); do [ "$(prop ActiveState)" = inactive ] && break; sleep 0.1; done
took=$((SECONDS - t))
expect_log 'SIGTERM received: shutting down'
expect_log '1 connection\(s\) may drain for up to 3.0s'
expect_log 'end=shutdown'
[ "$(prop Result)" = success ] && [ "$(prop ExecMainStatus)" = 0 ] \
    || fail "Result=$(prop Result) ExecMainStatus=$(prop ExecMainStatus)"
[ "$took" -ge 2 ] && [ "$took" -le 10 ] || fail "stop took ${took}s with shutdown_timeout = 3"
ok "SIGTERM -> STOPPING=1 (status 'draining connections'), drained shutdown_timeout = 3 s, closed the rest: Result=success, exit status 0 (${took}s)"

step "systemd-analyze security"
cin systemctl start gatewayd.service
SCORE_LINE=$(cin systemd-analyze security gatewayd.service --no-pager | grep 'Overall exposure level')
SCORE=$(sed -n 's/.*gatewayd.service: \([0-9.]*\).*/\1/p' <<<"$SCORE_LINE")
awk -v s="$SCORE" 'BEGIN { exit !(s > 0 && s <= 2.0) }' || fail "exposure $SCORE above 2.0: $SCORE_LINE"
ok "$SCORE_LINE"
cin systemctl stop gatewayd.service

step "poweroff"
if [ "${KEEP:-0}" = 1 ]; then
    echo "verify: KEEP=1: container '$VERIFY_CONTAINER' left running; stop it with: $(keep_hint)"
else
    container_stop || fail "container_stop"
fi
trap - EXIT
rm -rf "$HOSTTMP"
printf '\nverify: PASSED: %d checks in %ss on systemd %s (%s)\n' "$PASSED" $((SECONDS - T0)) \
    "$SYSTEMD_VERSION" "$VERIFY_VARIANT"
printf 'verify: systemd-analyze security gatewayd.service: %s (socket-only drop-in: %s)\n' \
    "$SCORE" "$SOCKET_ONLY_SCORE"
for line in "${SUMMARY[@]}"; do printf 'verify: %s\n' "$line"; done
