#!/bin/sh
# The gatewayd benchmark in one command (docs/performance.md):
#   bench/run.sh            the whole run, about 4 minutes (bounded at 10)
#   bench/run.sh --quick    shorter and noisier, about a minute
#   bench/run.sh --help     run.py's options (--only, --workloads, --json FILE)
# It installs what is missing first: gcc, libssl-dev, nginx (Debian's package), wrk
# (the HTTP rows' load generator) and util-linux's taskset with apt-get when root,
# the project's .venv (./dev setup) and websockify into that .venv. Needs 2 CPUs; everything listens on 127.0.0.1.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || ./dev setup
need=""
command -v gcc >/dev/null 2>&1 || need="$need gcc"
[ -f /usr/include/openssl/ssl.h ] || need="$need libssl-dev"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need="$need nginx"
command -v taskset >/dev/null 2>&1 || need="$need util-linux"
command -v wrk >/dev/null 2>&1 || need="$need wrk"
if [ -n "$need" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bench: installing$need with apt-get" >&2
        # Debian starts nginx on port 80 when it is installed; the benchmark
        # runs its own nginx on 127.0.0.1 only, so service starts are denied
        # during the install (policy-rc.d, the standard Debian switch).
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        fi
        apt-get update -qq >&2
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >&2
    else
        echo "bench: missing:$need (install them, e.g. sudo apt-get install$need)" >&2
        exit 1
    fi
fi
"$PY" -c "import websockify" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check websockify >&2
PATH="$PATH:/usr/sbin"
export PATH
"$PY" bench/run.py "$@"
