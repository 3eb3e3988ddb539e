#!/usr/bin/env bash
# Build the wheel, install it into a fresh venv outside the repository, run .ci/wheel_smoke.py there.
# A packaging gap (a subpackage or data file missing from the wheel) fails here, not for a user.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$repo/.venv/bin/python" -m pip wheel -q --no-deps -w "$work/dist" "$repo" 2>&1 | grep -v "^WARNING: Location" || true
rm -rf "$repo/build"
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
"$work/venv/bin/python" -m pip install -q "$work"/dist/any4ao-*.whl 2>&1 | grep -v "^WARNING: Location" || true
cp "$repo/.ci/wheel_smoke.py" "$work/"
cd "$work" && TRITON_INTERPRET=1 "$work/venv/bin/python" wheel_smoke.py
