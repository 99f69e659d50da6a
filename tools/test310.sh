#!/usr/bin/env bash
# The whole suite again on the oldest Python fastsip promises (requires-python >= 3.10),
# in a venv of its own (.venv310, git-ignored; FASTSIP_VENV310 to put it elsewhere) so the
# main interpreter's install is untouched.  The interpreter: $PYTHON310, else pyenv's 3.10,
# else python3.10 on PATH.  Extra arguments go to pytest, as with tools/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# (pyenv's python3.10 shim on PATH exits 127 when 3.10 is not selected: try each, keep the first that runs)
py=
for candidate in ${PYTHON310:-} "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10.*/bin/python3.10 python3.10; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' >/dev/null 2>&1; then
        py=$candidate
        break
    fi
done
if [ -z "$py" ]; then
    echo "tools/test310.sh: no Python 3.10 found (set PYTHON310=/path/to/python3.10)" >&2
    exit 1
fi
venv=${FASTSIP_VENV310:-.venv310}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
# the interop clients that .ci/run pip-installs for python3 (pjsua2), at the same version:
# the interop tests import them in the interpreter that runs pytest
clients=$(python3 -m pip freeze 2>/dev/null | grep -i '^pjsua2-python==' || true)
"$venv/bin/python" -m pip install -q -e '.[test]' $clients
"$venv/bin/python" -m pytest "$@"
