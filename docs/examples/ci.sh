#!/usr/bin/env bash
# Publish ToL bundles from CI: precompute, compress two ways, gate on perplexity, checksum, collect artifacts.
# Copy it into your repository (docs/ci.md uses ci/tol-bundles.sh) and run it from the repository's root:
#
#   CHECKPOINT=./my-memoryllm DATA=held-out.txt MAX_INCREASE=1 OUT=artifacts bash ci/tol-bundles.sh
#
# Defaults run on the demo model shipped with tolcli. Exit codes are tolcli's: 3 when the quality gate
# fails (the JSON report is still written), 4 for bad input, 5 for a failed verification.
set -euo pipefail
# The Python environment tolcli is installed in: ./.venv when there is one, else python3 on PATH. tolcli runs
# as `$PYTHON -m tolcli`, so the commands and the demo text below always come from the same installation.
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
TOLCLI=${TOLCLI:-"$PYTHON -m tolcli"}
CHECKPOINT=${CHECKPOINT:-demo}
DATA=${DATA:-$("$PYTHON" -c 'import tolcli; print(tolcli.demo_heldout_path())')}
CTX=${CTX:-128}
MAX_INCREASE=${MAX_INCREASE:-2}
OUT=${OUT:-artifacts}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}

mkdir -p "$OUT"
$TOLCLI info "$CHECKPOINT" --json > "$OUT/info.json"
$TOLCLI precompute "$CHECKPOINT" -o "$OUT/dense.safetensors" --force --quiet
$TOLCLI compress "$OUT/dense.safetensors" -o "$OUT/int4.safetensors" --scheme int4 --force --quiet
$TOLCLI compress "$OUT/dense.safetensors" -o "$OUT/svd-int4.safetensors" \
    --scheme adaptive-svd+int4 --budget 0.25 --force --quiet
for b in int4 svd-int4; do $TOLCLI verify "$OUT/$b.safetensors" --quiet; done

# The quality gate: exit 3 if a bundle's perplexity rises more than MAX_INCREASE percent.
status=0
$TOLCLI eval-ppl "$CHECKPOINT" --data "$DATA" --ctx "$CTX" \
    --tol "$OUT/int4.safetensors" --tol "$OUT/svd-int4.safetensors" \
    --max-increase "$MAX_INCREASE" --json > "$OUT/eval.json" || status=$?

(cd "$OUT" && sha256sum dense.safetensors int4.safetensors svd-int4.safetensors > SHA256SUMS)
exit $status
