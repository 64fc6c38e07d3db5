# A real systemd as PID 1 of a systemd-nspawn container, for verify-in-container.sh.
# Sourced (bash), not run. Needs root; installs what it needs from Debian.
#
#   container_boot         build (once) a minimal Debian root file system, boot it, wait for systemd
#   container_run CMD...   run CMD inside (nsenter into its namespaces; stdin/stdout/exit status pass)
#   container_stop         orderly poweroff, then SIGKILL whatever of ours is left (by PID/cgroup)
#
# Settings (environment):
#   VERIFY_VARIANT  bookworm (Debian 12, systemd 252; default) | trixie (Debian 13, systemd 257)
#   VERIFY_CONTAINER     machine name (default gatewayd-verify); one container per name at a time
#   VERIFY_STATE    where root file systems are cached (default /var/tmp/gatewayd-container)
#   VERIFY_BIND_RO  host paths bind-mounted read-only at the same path inside
#   VERIFY_MIRROR   Debian mirror (default: the host's apt source, else deb.debian.org)
#
# Every boot uses --volatile=overlay: the cached root file system stays as built, and all
# that is written inside lives in a tmpfs that goes away at container_stop. The container
# shares the host's network (pip works inside; a port opened inside is a host port).
# The host's cgroups may be v1/v2 hybrid: the container gets a pure v2 hierarchy and may
# use bpf(2), so systemd's BPF-based sandboxing (IPAddressDeny=, DeviceAllow=) is real.

VERIFY_VARIANT=${VERIFY_VARIANT:-bookworm}
VERIFY_CONTAINER=${VERIFY_CONTAINER:-gatewayd-verify}
VERIFY_STATE=${VERIFY_STATE:-/var/tmp/gatewayd-container}
VERIFY_BIND_RO=${VERIFY_BIND_RO:-}
_C_ROOTFS=$VERIFY_STATE/rootfs-$VERIFY_VARIANT
_C_RUN=$VERIFY_STATE/run-$VERIFY_CONTAINER
_C_CGROUP=gatewayd-container-$VERIFY_CONTAINER
_C_PACKAGES=systemd,systemd-sysv,dbus,libnss-systemd,libpam-systemd,python3,python3-venv,procps,iproute2,ca-certificates

_c_log() { echo "container: $*" >&2; }
_c_die() { echo "container: $*" >&2; return 1; }

_c_host_tools() {
    local missing=()
    command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v nsenter >/dev/null || missing+=(util-linux)
    [ ${#missing[@]} -eq 0 ] && return 0
    _c_log "installing on this machine: ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null || true
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
}

_c_mirror() {
    if [ -n "${VERIFY_MIRROR:-}" ]; then echo "$VERIFY_MIRROR"; return; fi
    local m
    m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { print $i; exit } }' \
        | grep -i debian | grep -vi security | head -n1 || true)
    [ -n "$m" ] || m=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk 'tolower($1) == "uris:" { print $2 }' | grep -i debian | grep -vi security | head -n1 || true)
    echo "${m:-http://deb.debian.org/debian}"
}

_c_build_rootfs() {
    [ -e "$_C_ROOTFS/.ready" ] && return 0
    case "$VERIFY_VARIANT" in bookworm|trixie) ;; *) _c_die "unknown VERIFY_VARIANT=$VERIFY_VARIANT (bookworm | trixie)" || return ;; esac
    mkdir -p "$VERIFY_STATE"
    exec 9>"$VERIFY_STATE/build.lock"
    flock -w 1200 9 || { _c_die "timed out waiting for $VERIFY_STATE/build.lock"; return; }
    if [ ! -e "$_C_ROOTFS/.ready" ]; then
        local tmp=$_C_ROOTFS.tmp log=$VERIFY_STATE/build-$VERIFY_VARIANT.log mirror
        mirror=$(_c_mirror)
        rm -rf "$tmp"
        _c_log "building a Debian $VERIFY_VARIANT root file system from $mirror (about a minute, once; log $log)"
        if ! debootstrap --variant=minbase --include="$_C_PACKAGES" "$VERIFY_VARIANT" "$tmp" "$mirror" >"$log" 2>&1; then
            tail -n 20 "$log" >&2
            exec 9>&-
            _c_die "debootstrap failed (log: $log)"
            return
        fi
        echo gatewayd-verify > "$tmp/etc/hostname"
        ln -sf /lib/systemd/system/multi-user.target "$tmp/etc/systemd/system/default.target"
        # No login prompts or periodic maintenance in a test machine.
        local unit
        for unit in console-getty.service getty@tty1.service apt-daily.timer apt-daily-upgrade.timer \
                    dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
                    systemd-timesyncd.service; do
            ln -sf /dev/null "$tmp/etc/systemd/system/$unit"
        done
        mkdir -p "$tmp/etc/systemd/system.conf.d"
        printf '[Manager]\nDefaultTimeoutStartSec=30s\nDefaultTimeoutStopSec=10s\n' \
            > "$tmp/etc/systemd/system.conf.d/50-bounded.conf"
        # pip inside uses the host's CA bundle (bind-mounted at boot): proxies with their own CA work.
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$tmp/etc/pip.conf"
        rm -f "$tmp"/var/cache/apt/archives/*.deb
        date -u +%FT%TZ > "$tmp/.ready"
        mv "$tmp" "$_C_ROOTFS"
    fi
    exec 9>&-
}

# PID of our systemd-nspawn, if alive.
_c_nspawn_pid() {
    local p
    p=$(cat "$_C_RUN/nspawn.pid" 2>/dev/null) || return 1
    [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = systemd-nspawn ] || return 1
    echo "$p"
}

# Host PID of the container's PID 1 (systemd, a child of our nspawn).
_c_leader_pid() {
    local np p
    np=$(_c_nspawn_pid) || return 1
    for p in $(ps -o pid= --ppid "$np" 2>/dev/null); do
        [ "$(cat "/proc/$p/comm" 2>/dev/null)" = systemd ] && { echo "$p"; return 0; }
    done
    return 1
}

# Our own cgroup (in each hierarchy the host has), so that container_stop finds every process.
_c_enter_cgroup() {
    local h
    for h in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
        [ -w "$h/cgroup.procs" ] || continue
        mkdir -p "$h/$_C_CGROUP" 2>/dev/null || continue
        echo "$BASHPID" > "$h/$_C_CGROUP/cgroup.procs" 2>/dev/null || true
    done
}

_c_cgroup_pids() {
    local h
    for h in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
        [ -d "$h/$_C_CGROUP" ] && find "$h/$_C_CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null
    done | sort -un
}

container_run() {
    local leader
    leader=$(_c_leader_pid) || { _c_die "container $VERIFY_CONTAINER is not running"; return; }
    nsenter --target "$leader" --mount --uts --ipc --net --pid --cgroup --root --wd -- \
        /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}

container_boot() {
    [ "$(id -u)" = 0 ] || { _c_die "must run as root"; return; }
    _c_host_tools || return
    _c_build_rootfs || return
    container_stop >/dev/null 2>&1 || true
    mkdir -p "$_C_RUN"
    local args=(-q -D "$_C_ROOTFS" --volatile=overlay -b -M "$VERIFY_CONTAINER"
                --register=no --keep-unit --console=read-only
                --system-call-filter=bpf
                --bind-ro=/etc/ssl/certs/ca-certificates.crt) path
    for path in $VERIFY_BIND_RO; do [ -e "$path" ] && args+=(--bind-ro="$path"); done
    # Detached from our session, in our own cgroup; pure cgroup v2 inside.
    ( _c_enter_cgroup
      export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1
      setsid bash -c 'echo $$ > "$1"; shift; exec systemd-nspawn "$@"' _ "$_C_RUN/nspawn.pid" "${args[@]}" \
          </dev/null >"$_C_RUN/console.log" 2>&1 & )
    local deadline=$((SECONDS + 60)) state=""
    until _c_leader_pid >/dev/null; do
        if [ $SECONDS -ge $deadline ] || { [ -s "$_C_RUN/nspawn.pid" ] && ! _c_nspawn_pid >/dev/null; }; then
            tail -n 30 "$_C_RUN/console.log" >&2
            container_stop >/dev/null 2>&1 || true
            _c_die "the container did not start"
            return
        fi
        sleep 0.05
    done
    while [ $SECONDS -lt $deadline ]; do
        state=$(container_run timeout 5 systemctl is-system-running --wait 2>/dev/null || true)
        case "$state" in running|degraded) break ;; esac
        sleep 0.1
    done
    case "$state" in
        running) ;;
        degraded) container_run systemctl --failed --no-legend >&2 ;;
        *) tail -n 30 "$_C_RUN/console.log" >&2; _c_die "systemd did not finish booting (state '$state')"; return ;;
    esac
    _c_log "$VERIFY_CONTAINER ($VERIFY_VARIANT) booted: $state"
}

container_stop() {
    local np i pids
    if np=$(_c_nspawn_pid); then
        kill -TERM "$np"                      # nspawn: orderly poweroff of the container
        for i in $(seq 300); do [ -d "/proc/$np" ] || break; sleep 0.1; done
        [ -d "/proc/$np" ] && kill -KILL "$np" 2>/dev/null
    fi
    for i in $(seq 10); do                    # anything left in our cgroup is ours
        pids=$(_c_cgroup_pids)
        [ -z "$pids" ] && break
        for np in $pids; do kill -KILL "$np" 2>/dev/null || true; done
        sleep 0.2
    done
    local h
    for h in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
        [ -d "$h/$_C_CGROUP" ] && find "$h/$_C_CGROUP" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
    rm -rf "$_C_RUN" "/run/systemd/nspawn/propagate/$VERIFY_CONTAINER"
    return 0
}
