#!/usr/bin/env bash
# `make demo`: the main job on the shipped demo model, end to end, with nothing downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${DEMO_OUT:-.demo-out}
mkdir -p "$OUT"
run() { echo; echo "\$ $*"; "$@"; }

run "$BIN/tolcli" info demo
run "$BIN/tolcli" precompute demo -o "$OUT/demo.safetensors" --dtype bf16 --force
run "$BIN/tolcli" inspect "$OUT/demo.safetensors"
run "$BIN/tolcli" convert "$OUT/demo.safetensors" "$OUT/demo.h5" --force --sha256sums "$OUT/SHA256SUMS"
run "$BIN/tolcli" verify "$OUT/demo.h5"
echo
echo "\$ $BIN/python -m tolcli.demo   # held-out perplexity of the demo models"
"$BIN/python" -m tolcli.demo
echo
echo "Bundles and SHA256SUMS are in $OUT/"
