#!/usr/bin/env bash
# The Flower loopback demo and test, on one machine:
#  1. a stock flwr 1.42 SuperLink on 127.0.0.1, four SegViz Rust nodes on four tiny phantom
#     sites, and the SegViz server app (flower/) running two rounds of FedBN;
#  2. the global model it saves must equal the in-process federation's (same seed, config);
#  3. a second run: a probe node checks that a wrong key and a tampered object are refused,
#     one node is killed mid-round (the round closes without it) and restarted (it rejoins);
#  4. the SuperLink is killed and restarted with an empty state: the nodes reconnect (with
#     backoff) and a third run aggregates all four;
#  5. TLS: a node trusting a test CA connects to a SuperLink with its certificate, and Ctrl-C
#     deactivates and unregisters it.
# Every process started here is stopped by PID at the end. Usage:
#   scripts/flower_loopback.sh [VENV]      (VENV: a venv with flower/requirements.txt;
#                                           created in target/flwr-venv when absent)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${1:-${FLWR_VENV:-$ROOT/target/flwr-venv}}
WORK=$ROOT/target/flower-loopback
BIN=$ROOT/target/debug/examples
PIDS=()

log() { echo "[loopback $(date +%H:%M:%S)] $*"; }
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 1
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
fail() {
  log "FAILED: $*"
  for f in "$WORK"/logs/*.log; do echo "----- $f (tail)"; tail -n 25 "$f"; done
  exit 1
}
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq 1 "$((limit * 5))"); do "$@" && return 0; sleep 0.2; done
  fail "timed out after ${limit}s waiting for $what"
}

if [ ! -x "$VENV/bin/flower-superlink" ]; then
  log "installing flwr into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r flower/requirements.txt
fi
export PATH=$VENV/bin:$PATH FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_HOME=$WORK/flwr-home

# The test profile and the whole workspace, as `cargo test --workspace` builds them, so that
# nothing is built twice (another profile or `-p` would build every dependency again).
log "building the examples (test profile, dependencies optimised)"
cargo build -q --profile test --example flower_node --example init_model --example make_phantoms \
  --example fedbn_four_organs
cargo test -q --workspace --test superlink --no-run

rm -rf "$WORK" && mkdir -p "$WORK/logs" "$FLWR_HOME"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "loopback"
[superlink.loopback]
address = "127.0.0.1:$PORT"
insecure = true
TOML

log "phantoms and the initial model"
"$BIN/make_phantoms" --out "$WORK/phantoms" --size tiny --cases 3 --btcv-cases 1 > "$WORK/logs/phantoms.log"
"$BIN/init_model" --preset tiny --seed 0 --out "$WORK/initial.segviz" > "$WORK/logs/init.log"
SITES=()
for d in "$WORK"/phantoms/*/; do
  case "$(basename "$d")" in *btcv*|*BTCV*) continue;; esac
  SITES+=("${d%/}")
done
[ "${#SITES[@]}" -eq 4 ] || fail "expected 4 training sites, found ${#SITES[@]}: ${SITES[*]}"

log "SuperLink on 127.0.0.1:$PORT"
start_superlink() { # start_superlink LOGFILE: in-memory state, as a restarted SuperLink has
  flower-superlink --insecure --host 127.0.0.1 --port "$PORT" \
    --disable-runtime-dependency-installation > "$1" 2>&1 &
  SUPERLINK=$!
  PIDS+=($SUPERLINK)
}
start_superlink "$WORK/logs/superlink.log"
healthy() { python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; }
wait_for 60 "the SuperLink" healthy

NODE_PIDS=()
start_node() { # start_node INDEX
  local i=$1 site=${SITES[$1]}
  "$BIN/flower_node" --superlink "127.0.0.1:$PORT" --insecure --data "$site" --preset tiny \
    --seed 0 --heartbeat-interval 10 --work-dir "$WORK/nodes/$i" >> "$WORK/logs/node$i.log" 2>&1 &
  NODE_PIDS[$i]=$!
  PIDS+=($!)
}
for i in 0 1 2 3; do start_node "$i"; done
for i in 0 1 2 3; do wait_for 120 "node $i to connect" grep -q "connected as node" "$WORK/logs/node$i.log"; done

log "run A: two rounds of FedBN with four nodes"
flwr run flower/ loopback --stream -c "initial-model=\"$WORK/initial.segviz\" out-dir=\"$WORK/runA\" num-server-rounds=2 local-epochs=1 strategy=\"fedbn\" min-nodes=4 round-timeout=300" \
  > "$WORK/logs/runA.log" 2>&1 || fail "flwr run (run A) failed"
[ -f "$WORK/runA/global.segviz" ] || fail "run A saved no global model"

log "the same federation in process"
"$BIN/fedbn_four_organs" --data "$WORK/phantoms" --preset tiny --methods fedbn --rounds 2 \
  --local-epochs 1 --seed 0 --out "$WORK/inprocess" > "$WORK/logs/inprocess.log" 2>&1 \
  || fail "the in-process federation failed"
python3 flower/tools/compare_models.py "$WORK/runA/global.segviz" \
  "$WORK/inprocess/checkpoints/fedbn/global.segviz" --tolerance 1e-5 \
  || fail "the Flower global model differs from the in-process one"

log "run B: a probe checks refusals, a node is killed mid-round and restarted"
SEGVIZ_SUPERLINK="127.0.0.1:$PORT" cargo test -q --workspace --test superlink -- \
  --ignored --nocapture > "$WORK/logs/probe.log" 2>&1 &
PROBE=$!
PIDS+=($PROBE)
wait_for 120 "the probe to connect" grep -q "probe: connected" "$WORK/logs/probe.log"
flwr run flower/ loopback --stream -c "initial-model=\"$WORK/initial.segviz\" out-dir=\"$WORK/runB\" num-server-rounds=3 local-epochs=40 strategy=\"fedbn\" min-nodes=5 round-timeout=180" \
  > "$WORK/logs/runB.log" 2>&1 &
RUN_B=$!
PIDS+=($RUN_B)
node3_training_in_run_b() { [ "$(grep -c "train instruction received" "$WORK/logs/node3.log")" -ge 3 ]; }
wait_for 120 "node 3 to start training in run B" node3_training_in_run_b
kill -9 "${NODE_PIDS[3]}"
[ "$(grep -c "train reply sent" "$WORK/logs/node3.log")" -eq 2 ] \
  || fail "node 3 finished its round-1 training before it could be killed"
log "killed node 3 (pid ${NODE_PIDS[3]}) during its round-1 training"
wait_for 120 "run B round 1 to close" test -f "$WORK/runB/history.json"
start_node 3
log "restarted node 3"
wait "$PROBE" || fail "the probe's checks failed (see probe.log)"
wait "$RUN_B" || fail "flwr run (run B) failed"
python3 - "$WORK/runB/history.json" "$(basename "${SITES[3]}")" <<'PY' || fail "run B history is not as expected"
import json, sys
history, killed = json.load(open(sys.argv[1])), sys.argv[2]
clients = [[a["client"] for a in r["aggregated"]] for r in history]
print("run B aggregated per round:", clients)
assert len(history) == 3, "three rounds expected"
assert len(clients[0]) == 3 and killed not in clients[0], "round 1 should close without the killed node"
assert killed in clients[-1], "the restarted node should rejoin by the last round"
PY

log "run C: the SuperLink crashes and restarts empty; every node reconnects and trains"
connections() { grep -c "connected as node" "$WORK/logs/node$1.log"; }
losses() { grep -c "connection lost" "$WORK/logs/node0.log" || true; }
BEFORE=()
for i in 0 1 2 3; do BEFORE[$i]=$(connections "$i"); done
LOST=$(losses)
kill -9 "$SUPERLINK"
noticed() { [ "$(losses)" -gt "$LOST" ]; }
wait_for 60 "node 0 to notice the SuperLink is gone" noticed
start_superlink "$WORK/logs/superlink-restarted.log"
wait_for 60 "the restarted SuperLink" healthy
reconnected() { [ "$(connections "$1")" -gt "${BEFORE[$1]}" ]; }
for i in 0 1 2 3; do wait_for 120 "node $i to reconnect" reconnected "$i"; done
flwr run flower/ loopback --stream -c "initial-model=\"$WORK/initial.segviz\" out-dir=\"$WORK/runC\" num-server-rounds=1 local-epochs=1 strategy=\"fedbn\" min-nodes=4 round-timeout=120" \
  > "$WORK/logs/runC.log" 2>&1 || fail "flwr run (run C, after the restart) failed"
python3 - "$WORK/runC/history.json" <<'PY' || fail "run C history is not as expected"
import json, sys
history = json.load(open(sys.argv[1]))
clients = [a["client"] for a in history[0]["aggregated"]]
print("run C aggregated:", clients)
assert len(clients) == 4, "all four reconnected nodes should be aggregated"
PY

log "TLS: a SuperLink with a certificate from a test CA; a node trusting that CA connects"
mkdir -p "$WORK/certs" && (
  cd "$WORK/certs"
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=segviz-test-ca" -keyout ca.key -out ca.crt
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout server.key -out server.csr
  printf "subjectAltName=IP:127.0.0.1,DNS:localhost\n" > san.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile san.ext -out server.crt
) > "$WORK/logs/certs.log" 2>&1 || fail "openssl could not make test certificates"
TLS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
flower-superlink --ssl-certfile "$WORK/certs/server.crt" --ssl-keyfile "$WORK/certs/server.key" \
  --ssl-ca-certfile "$WORK/certs/ca.crt" --host 127.0.0.1 --port "$TLS_PORT" \
  --disable-runtime-dependency-installation > "$WORK/logs/superlink-tls.log" 2>&1 &
PIDS+=($!)
"$BIN/flower_node" --superlink "127.0.0.1:$TLS_PORT" --root-ca "$WORK/certs/ca.crt" \
  --data "${SITES[0]}" --preset tiny --work-dir "$WORK/nodes/tls" > "$WORK/logs/node-tls.log" 2>&1 &
TLS_NODE=$!
PIDS+=($TLS_NODE)
wait_for 60 "the node to connect over TLS" grep -q "connected as node" "$WORK/logs/node-tls.log"
kill -INT "$TLS_NODE"
wait_for 30 "the TLS node to leave cleanly" grep -q "deactivated and unregistered" "$WORK/logs/node-tls.log"

log "OK: Flower global == in-process global; refusals, kill and rejoin, SuperLink restart, TLS behave"
