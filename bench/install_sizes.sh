#!/usr/bin/env bash
# Install size and time per role, each in a fresh virtual environment under build/install-sizes/
# with nothing cached: `pip install .` as the README says (everything), and the slim roles'
# `pip install -c constraints -r deploy/requirements/ROLE.txt && pip install --no-deps .`.
# Prints one line per role: role, seconds, MB (du -sm of the environment), a check's outcome.
#   bash bench/install_sizes.sh [python]     (docs/benchmarks.md has the figures)
set -euo pipefail
PY=${1:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/build/install-sizes
REQ=$ROOT/deploy/requirements
mkdir -p "$OUT"
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

install() {  # role, then the pip install arguments of its first step
    local role=$1; shift
    rm -rf "${OUT:?}/$role"
    "$PY" -m venv "$OUT/$role"
    local start=$SECONDS
    (cd "$OUT" && "$OUT/$role/bin/pip" install -q "$@")
    if [ "$role" != readme ]; then
        (cd "$OUT" && "$OUT/$role/bin/pip" install -q --no-deps "$ROOT")
    fi
    local took=$((SECONDS - start))
    rm -rf "$ROOT/build/lib" "$ROOT"/*.egg-info
    local check=ok
    case $role in  # the role's own command starts (TensorFlow-free roles have none to import)
        dashboard) "$OUT/$role/bin/python" -c "from fedq.ops.dashboard.app import create_app" || check=FAILED ;;
        aggregator) "$OUT/$role/bin/python" -c "import fedq.roles.jobs" || check=FAILED ;;
        *) "$OUT/$role/bin/fedq" --help >/dev/null || check=FAILED ;;
    esac
    echo "$role $took s $(du -sm "$OUT/$role" | cut -f1) MB $check"
}

install dashboard -c "$REQ/constraints.txt" -r "$REQ/dashboard.txt"
install aggregator -c "$REQ/constraints.txt" -r "$REQ/aggregator.txt"
install client -c "$REQ/constraints.txt" -r "$REQ/full.txt"
install readme "$ROOT"
