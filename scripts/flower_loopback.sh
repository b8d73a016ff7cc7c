#!/usr/bin/env bash
# The Flower loopback demo and test, on one machine:
#  1. a stock flwr 1.42 SuperLink on 127.0.0.1, four SegViz Rust nodes on four tiny phantom
#     sites, and the SegViz server app (flower/) running two rounds of FedBN;
#  2. the global model it saves must equal the in-process federation's (same seed, config);
#  3. a second run: a probe node checks that a wrong key and a tampered object are refused,
#     one node is killed mid-round (the round closes without it) and restarted (it rejoins);
#     the probe leaves its reply half-uploaded, as a node killed mid-upload does: the phase
#     closes without waiting for Flower's 180 s upload TTL (straggler-timeout 5 s);
#  4. the SuperLink is killed and restarted with an empty state: the nodes reconnect (with
#     backoff) and a third run aggregates all four;
#  5. a run that fails (a missing initial model) is seen as failed: `flwr run --stream` exits 0
#     for a failed run, so every run here is judged by its status on the SuperLink (`flwr ls`);
#  6. SIGTERM (kill, systemd, docker stop) makes every node deactivate and exit 0;
#  7. Flower's stock FedAvg (scripts/stock_fedavg_app) over four nodes of different organs
#     started with --uniform-reply: two rounds complete and every head moved;
#  8. TLS: a node trusting a test CA connects to a SuperLink with its certificate, and Ctrl-C
#     deactivates it.
# Every process started here is stopped by PID at the end. Usage:
#   scripts/flower_loopback.sh [VENV]      (VENV: a venv with flower/requirements.txt;
#                                           created in target/flwr-venv when absent)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${1:-${FLWR_VENV:-$ROOT/target/flwr-venv}}
WORK=$ROOT/target/flower-loopback
# Binaries are copied from cargo's target folder (CARGO_TARGET_DIR when set) into $WORK/bin,
# so that another build in a shared target folder cannot swap them during the run.
BUILT=${CARGO_TARGET_DIR:-$ROOT/target}/debug/examples
BIN=$WORK/bin
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
PROBE_BIN=$(cargo test --workspace --test superlink --no-run 2>&1 \
  | sed -n 's/.*Executable tests\/superlink.rs (\(.*\))/\1/p' | tail -n 1)
[ -x "$PROBE_BIN" ] || { echo "cannot find the superlink probe test binary"; exit 1; }

rm -rf "$WORK" && mkdir -p "$WORK/logs" "$WORK/bin" "$FLWR_HOME"
cp "$BUILT/flower_node" "$BUILT/init_model" "$BUILT/make_phantoms" "$BUILT/fedbn_four_organs" "$BIN/"
cp "$PROBE_BIN" "$BIN/superlink-probe"
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
start_node() { # start_node INDEX [EXTRA FLAGS...]
  local i=$1 site=${SITES[$1]}; shift
  "$BIN/flower_node" --superlink "127.0.0.1:$PORT" --insecure --data "$site" --preset tiny \
    --seed 0 --heartbeat-interval 10 --work-dir "$WORK/nodes/$i" "$@" >> "$WORK/logs/node$i.log" 2>&1 &
  NODE_PIDS[$i]=$!
  PIDS+=($!)
}

# `flwr run --stream` exits 0 even when the run fails (Flower's behaviour), so a run is judged
# by its final status on the SuperLink: `flwr ls --run-id ID --format json`.
run_status() { # run_status LOGFILE: waits (60 s at most) for the run LOGFILE started to finish; prints "status|details"
  local id st
  id=$(sed -n 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p' "$1" | head -n 1)
  [ -n "$id" ] || { echo "no run id in $1"; return 1; }
  for _ in $(seq 1 120); do
    st=$(flwr ls loopback --run-id "$id" --format json 2>/dev/null | python3 -c '
import json, sys
run = json.load(sys.stdin)["runs"][0]
print(run["status"] + "|" + (run["status-details"] or ""))' 2>/dev/null) || st=""
    case "$st" in finished:*) echo "$st"; return 0;; esac
    sleep 0.5
  done
  echo "run $id did not finish within 60 s (last status: ${st:-unknown})"
  return 1
}
expect_completed() { # expect_completed LOGFILE WHAT
  local st
  st=$(run_status "$1") || fail "$2: $st"
  [ "${st%%|*}" = "finished:completed" ] || fail "$2 did not complete: $st"
  log "$2: $st"
}
for i in 0 1 2 3; do start_node "$i"; done
for i in 0 1 2 3; do wait_for 120 "node $i to connect" grep -q "connected as node" "$WORK/logs/node$i.log"; done

log "run A: two rounds of FedBN (server learning rate 2, as the tiny preset) with four nodes"
flwr run flower/ loopback --stream -c "initial-model=\"$WORK/initial.segviz\" out-dir=\"$WORK/runA\" num-server-rounds=2 local-epochs=1 strategy=\"fedbn\" server-learning-rate=2.0 min-nodes=4 round-timeout=300" \
  > "$WORK/logs/runA.log" 2>&1 || fail "flwr run (run A) could not start"
expect_completed "$WORK/logs/runA.log" "run A"
[ -f "$WORK/runA/global.segviz" ] || fail "run A saved no global model"

log "the same federation in process"
"$BIN/fedbn_four_organs" --data "$WORK/phantoms" --preset tiny --methods fedbn --rounds 2 \
  --local-epochs 1 --seed 0 --out "$WORK/inprocess" > "$WORK/logs/inprocess.log" 2>&1 \
  || fail "the in-process federation failed"
python3 flower/tools/compare_models.py "$WORK/runA/global.segviz" \
  "$WORK/inprocess/models/fedbn/global.segviz" --tolerance 1e-5 \
  || fail "the Flower global model differs from the in-process one"

log "run B: a probe checks refusals, a node is killed mid-round and restarted"
# The test binary itself, not `cargo test`: cargo could wait for another build's lock.
SEGVIZ_SUPERLINK="127.0.0.1:$PORT" "$BIN/superlink-probe" --ignored --nocapture \
  > "$WORK/logs/probe.log" 2>&1 &
PROBE=$!
PIDS+=($PROBE)
wait_for 120 "the probe to connect" grep -q "probe: connected" "$WORK/logs/probe.log"
# All five (the probe included) are connected now, and the app sends to every connected node.
flwr run flower/ loopback --stream -c "initial-model=\"$WORK/initial.segviz\" out-dir=\"$WORK/runB\" num-server-rounds=3 local-epochs=40 strategy=\"fedbn\" min-nodes=4 round-timeout=180 straggler-timeout=5" \
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
wait "$RUN_B" || fail "flwr run (run B) could not start"
expect_completed "$WORK/logs/runB.log" "run B"
python3 - "$WORK/runB/history.json" "$(basename "${SITES[3]}")" <<'PY' || fail "run B history is not as expected"
import json, sys
history, killed = json.load(open(sys.argv[1])), sys.argv[2]
clients = [[a["client"] for a in r["aggregated"]] for r in history]
print("run B aggregated per round:", clients)
assert len(history) == 3, "three rounds expected"
assert len(clients[0]) == 3 and killed not in clients[0], "round 1 should close without the killed node"
assert killed in clients[-1], "the restarted node should rejoin by the last round"
# The probe's half-uploaded reply: either still in transfer when straggler-timeout closed the
# phase, or replaced by "Node Unavailable" once the SuperLink noticed the probe left (which
# comes first is a race); never a wait for Flower's 180 s upload TTL.
probe = [f["reason"] for f in history[0]["failed"] if f["reason"].startswith("identity (query)")]
print(f"run B round 1: {history[0]['seconds']:.1f} s; the probe's query reply: {probe}")
assert len(probe) == 1 and ("straggler-timeout (5 s" in probe[0] or "Node Unavailable" in probe[0]), probe
assert history[0]["seconds"] < 120, "round 1 waited for the probe's half-uploaded reply"
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
  > "$WORK/logs/runC.log" 2>&1 || fail "flwr run (run C, after the restart) could not start"
expect_completed "$WORK/logs/runC.log" "run C"
python3 - "$WORK/runC/history.json" <<'PY' || fail "run C history is not as expected"
import json, sys
history = json.load(open(sys.argv[1]))
clients = [a["client"] for a in history[0]["aggregated"]]
print("run C aggregated:", clients)
assert len(clients) == 4, "all four reconnected nodes should be aggregated"
PY

log "run D: a run that fails (missing initial model) must be reported as failed"
set +e
flwr run flower/ loopback --stream -c "initial-model=\"$WORK/absent.segviz\" out-dir=\"$WORK/runD\" num-server-rounds=1 min-nodes=4" \
  > "$WORK/logs/runD.log" 2>&1
RUN_D_EXIT=$?
set -e
ST=$(run_status "$WORK/logs/runD.log") || fail "run D: $ST"
log "run D: flwr run exited $RUN_D_EXIT; the SuperLink says $ST"
[ "${ST%%|*}" = "finished:failed" ] || fail "run D should have failed, its status is $ST"
case "$ST" in *absent.segviz*) ;; *) fail "run D's failure does not name the missing file: $ST";; esac

log "SIGTERM: every node finishes, deactivates and exits 0"
for i in 0 1 2 3; do kill -TERM "${NODE_PIDS[$i]}"; done
for i in 0 1 2 3; do
  set +e; timeout 30 tail --pid="${NODE_PIDS[$i]}" -f /dev/null; wait "${NODE_PIDS[$i]}"; CODE=$?; set -e
  [ "$CODE" -eq 0 ] || fail "node $i exited with status $CODE after SIGTERM (expected 0)"
  [ "$(tail -n 3 "$WORK/logs/node$i.log" | grep -c "deactivated (still registered")" -eq 1 ] \
    || fail "node $i did not deactivate on SIGTERM"
done

log "run E: Flower's stock FedAvg over the four sites (different organs), nodes with --uniform-reply"
# The same keys: a node that left cleanly (SIGTERM above) rejoins with its key.
for i in 0 1 2 3; do
  BEFORE[$i]=$(connections "$i")
  start_node "$i" --uniform-reply
done
for i in 0 1 2 3; do wait_for 120 "node $i to connect with --uniform-reply" reconnected "$i"; done
PYTHONPATH=flower python3 - "$WORK/initial.segviz" "$WORK/initial.npz" <<'PY' || fail "cannot export the initial model"
import sys
import numpy as np
from segviz_flower.segviz_format import read_checkpoint
np.savez(sys.argv[2], **{p: t.data for p, t in read_checkpoint(sys.argv[1]).tensors.items()})
PY
flwr run scripts/stock_fedavg_app loopback --stream -c "initial-npz=\"$WORK/initial.npz\" out-dir=\"$WORK/runE\" num-server-rounds=2 local-epochs=1 min-nodes=4 round-timeout=120" \
  > "$WORK/logs/runE.log" 2>&1 || fail "flwr run (run E) could not start"
expect_completed "$WORK/logs/runE.log" "run E (stock FedAvg)"
grep -q "InconsistentMessageReplies\|Skipping aggregation" "$WORK/logs/runE.log" && fail "stock FedAvg skipped an aggregation"
python3 - "$WORK/initial.npz" "$WORK/runE" <<'PY' || fail "run E's result is not as expected"
import json, sys
import numpy as np
initial, final = np.load(sys.argv[1]), np.load(sys.argv[2] + "/final.npz")
metrics = json.load(open(sys.argv[2] + "/metrics.json"))
assert sorted(final.files) == sorted(initial.files), "the final model lost or gained tensors"
heads = sorted({p.split(".")[1] for p in initial.files if p.startswith("heads.")})
moved = {h: any(not np.array_equal(initial[p], final[p]) for p in initial.files if p.startswith(f"heads.{h}.")) for h in heads}
print("run E: heads moved:", moved, "| train metrics:", metrics["train"], "| evaluate:", metrics["evaluate"])
assert all(moved.values()), f"a head did not move: {moved}"
assert sorted(metrics["train"]) == ["1", "2"] and "dice" in metrics["evaluate"]["2"], metrics
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
wait_for 30 "the TLS node to leave cleanly" grep -q "deactivated (still registered" "$WORK/logs/node-tls.log"

log "OK: Flower global == in-process global; refusals, kill and rejoin, SuperLink restart, failed-run status, SIGTERM, stock FedAvg, TLS behave"
