#!/usr/bin/env bash
# Lint and stub check (CI runs this from .ci/run, before the suites).
#   1. ruff check .              the rules are in pyproject.toml ([tool.ruff])
#   2. python3 tools/stubcheck.py  every compiled module has a .pyi, and mypy.stubtest
#                                  finds it in agreement with the built module
# Installs the pinned ruff and mypy when python3 lacks them (or has other versions: a
# new ruff brings new findings, so the pin moves on purpose).  The stub check needs the
# compiled modules: they are built in place first (a no-op when up to date).
# Both steps always run; the exit status is 1 if either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUFF_VERSION=0.17.6
MYPY_VERSION=2.4.1

need=()
[ "$(python3 -m ruff --version 2>/dev/null)" = "ruff $RUFF_VERSION" ] || need+=("ruff==$RUFF_VERSION")
python3 -c "import sys, mypy.version; sys.exit(mypy.version.__version__ != '$MYPY_VERSION')" \
    >/dev/null 2>&1 || need+=("mypy==$MYPY_VERSION")
python3 -c "import Cython" >/dev/null 2>&1 || need+=("cython>=3")
if ((${#need[@]})); then
    echo "tools/lint.sh: installing ${need[*]}"
    python3 -m pip install -q "${need[@]}" || exit 1
fi

status=0
echo "tools/lint.sh: ruff check ."
python3 -m ruff check . || status=1

echo "tools/lint.sh: building the compiled modules in place"
log=$(mktemp)
if ! python3 setup.py -q build_ext --inplace >"$log" 2>&1; then
    cat "$log" >&2
    status=1
fi
rm -f "$log"
python3 tools/stubcheck.py || status=1

exit $status
