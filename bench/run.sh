#!/bin/sh
# The gatewayd benchmark in one command (docs/performance.md):
#   bench/run.sh            the whole run, about 8 minutes (bounded at 15)
#   bench/run.sh --quick    shorter and noisier, about 4 minutes
#   bench/run.sh --profile  the same, with py-spy profiles of the gatewayd rows (bench/profiles/)
#   bench/run.sh --help     run.py's options (--only, --workloads, --json FILE, --profile [DIR])
# It installs what is missing first: gcc, libssl-dev, nginx, haproxy and caddy (Debian's
# packages), wrk (the HTTP rows' load generator) and util-linux's taskset with apt-get
# when root, the project's .venv (./dev setup), websockify into that .venv, and py-spy
# there too with --profile. Needs 2 CPUs; everything listens on 127.0.0.1.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || ./dev setup
need=""
command -v gcc >/dev/null 2>&1 || need="$need gcc"
[ -f /usr/include/openssl/ssl.h ] || need="$need libssl-dev"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need="$need nginx"
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need="$need haproxy"
command -v caddy >/dev/null 2>&1 || [ -x /usr/bin/caddy ] || need="$need caddy"
command -v taskset >/dev/null 2>&1 || need="$need util-linux"
command -v wrk >/dev/null 2>&1 || need="$need wrk"
if [ -n "$need" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bench: installing$need with apt-get" >&2
        # Debian starts nginx, haproxy and caddy (ports 80, 443, 2019) when they
        # are installed; the benchmark runs its own on 127.0.0.1 only, so service
        # starts are denied during the install (policy-rc.d, the standard Debian switch).
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        fi
        # Other jobs on the machine may hold dpkg's lock: wait for it (bounded).
        apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq $need >&2
    else
        echo "bench: missing:$need (install them, e.g. sudo apt-get install$need)" >&2
        exit 1
    fi
fi
"$PY" -c "import websockify" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check websockify >&2
for arg in "$@"; do
    case "$arg" in
        --profile|--profile=*)
            [ -x "$(dirname "$PY")/py-spy" ] || "$PY" -m pip install -q --disable-pip-version-check py-spy >&2 ;;
    esac
done
PATH="$PATH:/usr/sbin"
export PATH
"$PY" bench/run.py "$@"
