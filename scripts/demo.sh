#!/usr/bin/env bash
# make demo: build demo model -> compress -> profile -> (audits, package, serve as they land).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-demo-out}
EW=(${PY} -m hardening)
mkdir -p "$OUT"
echo "== 1. demo models"
"${EW[@]}" demo-model --out "$OUT/models"
M="$OUT/models/digits"
echo "== 2. compress"
"${EW[@]}" compress "$M/model.onnx" --data "$M/data.npz" --torch-source "$M/model.pt" --out "$OUT/variants"
echo "== 3. profile"
"${EW[@]}" profile "$OUT/variants/variants.json" --data "$M/data.npz" --runs 100 --json > "$OUT/profile.json"
"${EW[@]}" profile "$OUT/variants/variants.json" --data "$M/data.npz" --runs 100
echo "demo finished: outputs in $OUT"
