#!/usr/bin/env bash
# The README's test command: installs fastsip (building the Cython modules) with
# its test dependencies, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[test]'
python3 -m pytest "$@"
