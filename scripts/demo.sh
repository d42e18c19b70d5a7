#!/usr/bin/env bash
# `make demo`: the main job on the shipped demo model, end to end, with nothing downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${DEMO_OUT:-.demo-out}
mkdir -p "$OUT"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}

echo "== tolcli info demo"
"$BIN/tolcli" info demo
echo
echo "== held-out perplexity of the demo models (python -m tolcli.demo)"
"$BIN/python" -m tolcli.demo
