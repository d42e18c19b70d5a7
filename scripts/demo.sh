#!/usr/bin/env bash
# `make demo`: the main job on the shipped demo model, end to end, with nothing downloaded:
# precompute the ToLs, compress them two ways, verify, pack, and measure what each costs.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${DEMO_OUT:-.demo-out}
mkdir -p "$OUT"
run() { echo; echo "\$ $*"; "$@"; }

run "$BIN/tolcli" info demo
run "$BIN/tolcli" precompute demo -o "$OUT/dense.safetensors" --force
run "$BIN/tolcli" compress "$OUT/dense.safetensors" -o "$OUT/int4.safetensors" --scheme int4 --force
run "$BIN/tolcli" compress "$OUT/dense.safetensors" -o "$OUT/svd-int4.h5" --scheme adaptive-svd+int4 --budget 0.25 --force
run "$BIN/tolcli" inspect "$OUT/int4.safetensors"
run "$BIN/tolcli" verify "$OUT/svd-int4.h5"
run "$BIN/tolcli" pack "$OUT/int4.safetensors" -o "$OUT/int4.safetensors.zst" --force --sha256sums "$OUT/SHA256SUMS"
run "$BIN/tolcli" eval-ppl demo --data tolcli/demo/heldout.txt --ctx 128 --stride 64 \
    --tol "$OUT/int4.safetensors" --tol "$OUT/svd-int4.h5" --drop-last 1
echo
echo "Bundles, the packed int4 bundle and SHA256SUMS are in $OUT/"
