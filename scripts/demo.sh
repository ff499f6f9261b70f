#!/usr/bin/env bash
# Full release flow on the digits demo:
#   demo model -> audit (quick) -> gate vs itself -> keys -> package -> serve -> queries -> stop.
# Usage: scripts/demo.sh [WORK_DIR]   (default: demo-out/, rebuilt each run)
# Everything binds 127.0.0.1. Exit code is non-zero if any step fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
ew() { "$PY" -m hardening "$@"; }
W="${1:-demo-out}"
rm -rf "$W"
mkdir -p "$W"
SERVER_PID=""
cleanup() { if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; fi; }
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. demo model (digits CNN, classes 0-5) -> $W/demo"
ew demo-model --name digits --out "$W/demo"
D="$W/demo/digits"

step "2. security review (quick profile): report.json, report.html, junit.xml"
set +e
ew audit "$D/model.onnx" --data "$D/data.npz" --torch-source "$D/model.pt" --out "$W/review"
AUDIT_RC=$?
set -e
[[ $AUDIT_RC -le 1 ]] || { echo "audit failed with exit $AUDIT_RC"; exit "$AUDIT_RC"; }
echo "audit exit code: $AUDIT_RC (0 = every policy check passed); open $W/review/report.html"

step "3. CI gate: candidate vs baseline (here: the same report, so no regression)"
ew gate "$W/review/report.json" --baseline "$W/review/report.json" --regressions-only

step "4. keys and signed bundle of the int8_static variant"
ew keygen --out "$W/keys"
FORCE=()
[[ $AUDIT_RC -eq 0 ]] || FORCE=(--force)  # a failed review can only ship forced (the manifest says so)
ew package "$W/review/report.json" --variant int8_static --out "$W/bundle.ewb" --version 1 \
  --signing-key "$W/keys/signing.pem" --key-file "$W/keys/kek.key" --gate-action reject "${FORCE[@]}"
ew verify "$W/bundle.ewb" --public-key "$W/keys/signing.pub.pem" --key-file "$W/keys/kek.key" --report "$W/review/report.json"

step "5. serve on 127.0.0.1"
PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
ew serve "$W/bundle.ewb" --public-key "$W/keys/signing.pub.pem" --key-file "$W/keys/kek.key" \
  --host 127.0.0.1 --port "$PORT" > "$W/serve.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 60); do
  curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited:"; cat "$W/serve.log"; exit 1; }
  sleep 0.5
done
curl -fsS "http://127.0.0.1:$PORT/readyz"; echo

step "6. queries: two digits from the test split, one held-out digit (OOD), one malformed request"
"$PY" - "$D/data.npz" "$PORT" <<'PYEOF'
import json, sys, urllib.error, urllib.request
import numpy as np
z = np.load(sys.argv[1], allow_pickle=False)
url = f"http://127.0.0.1:{sys.argv[2]}/v1/predict"
def post(name, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            code, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        code, text = e.code, e.read().decode()
    print(f"{name:<28} HTTP {code}  {text[:160]}")
post(f"test digit (label {int(z['y'][0])})", {"inputs": z["x"][:1].tolist()})
post(f"test digit (label {int(z['y'][1])})", {"inputs": z["x"][1:2].tolist()})
post("held-out digit 6-9 (OOD)", {"inputs": z["ood_heldout"][:1].tolist()})
post("malformed (wrong shape)", {"inputs": [[0.5, 0.5]]})
PYEOF
curl -sS "http://127.0.0.1:$PORT/v1/model"; echo

step "7. stop"
cleanup
SERVER_PID=""
echo "done; artifacts in $W"
