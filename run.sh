#!/usr/bin/env bash
# One entry point for a fresh machine with only Python >= 3.10:
#   bash run.sh demo [demo options]   set up, then run the whole pipeline on a generated example data set
#   bash run.sh test [pytest options] set up, then run the test suite
#   bash run.sh bench [names]         set up, then run the benchmarks in bench/
# Set-up = a virtual environment in .venv (or $CRYOPIPE_VENV), torch==2.13.0 installed first (CPU build),
# then cryopipe and its dependencies (with the test and dask extras) under a constraints file that pins torch,
# so nothing pulls CUDA wheels.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
venv="${CRYOPIPE_VENV:-$here/.venv}"
py="${PYTHON:-python3}"

setup() {
    if [ ! -x "$venv/bin/python" ]; then
        echo "[run.sh] creating virtual environment in $venv"
        "$py" -m venv "$venv"
    fi
    local stamp="$venv/.cryopipe-installed"
    local want
    want="$(cat pyproject.toml constraints.txt | sha1sum | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "[run.sh] installing torch==2.13.0 then cryopipe (first run only)"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,dask]"
        echo "$want" > "$stamp"
    fi
}

ensure_chromium() {  # the browser tests of `cryopipe view` drive the system's Chromium; without it they skip
    command -v chromium >/dev/null && command -v chromedriver >/dev/null && return 0
    [ "${CRYOPIPE_NO_BROWSER:-0}" = 1 ] && return 0
    command -v apt-get >/dev/null || { echo "[run.sh] no apt-get: the viewer's browser tests will be skipped"; return 0; }
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if sudo -n true 2>/dev/null; then sudo="sudo -n"; else
            echo "[run.sh] not root: the viewer's browser tests will be skipped"; return 0; fi
    fi
    echo "[run.sh] installing chromium + chromium-driver (Debian packages) for the viewer's browser tests"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 && \
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
        echo "[run.sh] chromium install failed: the viewer's browser tests will be skipped"
}

cmd="${1:-test}"
shift || true
setup
case "$cmd" in
    demo)  exec "$venv/bin/cryopipe" demo "$@" ;;
    test)  ensure_chromium; exec "$venv/bin/python" -m pytest -q "$@" ;;
    bench) exec "$venv/bin/python" bench/run_all.py "$@" ;;
    setup) echo "[run.sh] environment ready: $venv" ;;
    *) echo "usage: bash run.sh {demo|test|bench|setup} [args]" >&2; exit 2 ;;
esac
