#!/usr/bin/env bash
# benchmarks/run.sh - Conduit's gateway path (synthetic engine, zero delay) measured
# side by side with a direct OpenAI-compatible backend and, optionally, LiteLLM's proxy.
#
#   bash benchmarks/run.sh [--with-litellm] [--quick] [--workers 2] [options] [-- harness options]
#
# One command: installs what is missing (wrk; a bench venv; LiteLLM only with
# --with-litellm), starts redis + the synthetic engine + Conduit's gateway (1 worker,
# and a 2-worker gateway with --workers 2), the harness's mock backend and (with
# --with-litellm) LiteLLM with 1 and 2 workers as the harness's run_litellm_peer.sh
# does, runs the harness (peer_overhead.sh) and benchmarks/gateway_path.py, writes
# everything under the output folder, prints the report and stops everything it
# started (on any exit). Loopback only; every step is bounded in time.
# Run on purpose, not in CI. See benchmarks/README.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="$ROOT/benchmarks"

usage() {
  sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --with-litellm        also install (once, into $HOME_DIR/venv-litellm) and measure LiteLLM's proxy,
                        1 and 2 workers, in front of the harness's mock backend
  --quick               short runs: harness -d 5 -w 2 --stream-duration 8 --stream-warmup 2 -r 1,
                        gateway_path.py --quick
  --workers N           1 (default) or 2: with 2, a second Conduit gateway with 2 workers
                        ("conduit-2w") is measured too
  --harness PATH        the peer-overhead harness (default: <repo>/../shared/bench); used when present
  --no-harness          do not use the harness even if present (gateway_path.py only)
  --no-gateway-path     do not run benchmarks/gateway_path.py
  --with-images         also run benchmarks/images.py (tiny diffusers pipeline; its own Redis, gateway and
                        engine on free ports): images/s and latency, raw pipeline vs Conduit
  -r, --repeats N       harness repeats (default 1)
  -o, --out DIR         output folder (default: $HOME_DIR/<timestamp>)
  --home DIR            where venvs live (default: $CONDUIT_BENCH_HOME or /tmp/conduit-bench)
  --harness-timeout S   hard limit for the harness run (default: estimated from the durations x2)
  -- ARGS...            passed to peer_overhead.sh as they are (e.g. -- -c "1 64" -s "100")
Ports (environment): CONDUIT_PORT (8000), CONDUIT_PORT_2W (8001), REDIS_PORT (6399),
  MOCK_PORT (8100), L1_PORT (4001), L2_PORT (4002). CONDUIT_API_KEY: sent to Conduit if set.
EOF
}

WITH_LITELLM=0; WITH_IMAGES=0; QUICK=0; WORKERS=1; HARNESS="$ROOT/../shared/bench"; USE_HARNESS=1; USE_GP=1
REPEATS=1; OUT=""; HOME_DIR="${CONDUIT_BENCH_HOME:-/tmp/conduit-bench}"; HARNESS_TIMEOUT=""; EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --with-litellm) WITH_LITELLM=1; shift ;;
    --with-images) WITH_IMAGES=1; shift ;;
    --quick) QUICK=1; shift ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --harness) HARNESS="$2"; shift 2 ;;
    --no-harness) USE_HARNESS=0; shift ;;
    --no-gateway-path) USE_GP=0; shift ;;
    -r|--repeats) REPEATS="$2"; shift 2 ;;
    -o|--out) OUT="$2"; shift 2 ;;
    --home) HOME_DIR="$2"; shift 2 ;;
    --harness-timeout) HARNESS_TIMEOUT="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ $WORKERS == 1 || $WORKERS == 2 ]] || { echo "--workers must be 1 or 2" >&2; exit 2; }

CONDUIT_PORT="${CONDUIT_PORT:-8000}"; CONDUIT_PORT_2W="${CONDUIT_PORT_2W:-8001}"; REDIS_PORT="${REDIS_PORT:-6399}"
MOCK_PORT="${MOCK_PORT:-8100}"; L1_PORT="${L1_PORT:-4001}"; L2_PORT="${L2_PORT:-4002}"
LITELLM_KEY=sk-bench-master   # general_settings.master_key in the harness's litellm.config.yaml
CONDUIT_BIN="$ROOT/.venv/bin/conduit"
OUT="${OUT:-$HOME_DIR/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$HOME_DIR" "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
BVENV="$HOME_DIR/venv-bench"; BPY="$BVENV/bin/python"
LVENV="$HOME_DIR/venv-litellm"; LITELLM="$LVENV/bin/litellm"

if [[ $USE_HARNESS == 1 && -f $HARNESS/peer_overhead.sh && -f $HARNESS/mock_openai.py ]]; then
  HARNESS="$(cd "$HARNESS" && pwd)"
else
  [[ $USE_HARNESS == 1 ]] && echo "note: no harness at $HARNESS; running benchmarks/gateway_path.py only" >&2
  USE_HARNESS=0
fi
if [[ $WITH_LITELLM == 1 && $USE_HARNESS == 0 ]]; then
  echo "note: --with-litellm needs the harness (its mock backend and LiteLLM config); LiteLLM is skipped" >&2
  WITH_LITELLM=0
fi
[[ $USE_HARNESS == 0 && $USE_GP == 0 ]] && { echo "nothing to run (--no-harness without a harness and --no-gateway-path)" >&2; exit 2; }
[[ -x $CONDUIT_BIN ]] || { echo "no $CONDUIT_BIN: install the project first (python -m venv .venv && .venv/bin/pip install -e .)" >&2; exit 1; }

log() { printf '[run.sh %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# ---- install what is missing (bounded) ---------------------------------------------
as_root() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo -n "$@"; fi; }
APT_UPDATED=0
apt_install() {  # packages...
  if [[ $APT_UPDATED == 0 ]]; then as_root timeout 600 apt-get update -qq || true; APT_UPDATED=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq "$@"
}
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v curl >/dev/null || need+=(curl)
[[ -x /usr/bin/time ]] || need+=(time)
[[ $USE_HARNESS == 1 ]] && { command -v wrk >/dev/null || need+=(wrk); }
if [[ ${#need[@]} -gt 0 ]]; then log "apt-get install ${need[*]}"; apt_install "${need[@]}"; fi

if ! "$BPY" -c 'import uvloop, httptools, aiohttp, orjson' 2>/dev/null; then
  log "creating the bench venv $BVENV (uvloop httptools aiohttp orjson)"
  [[ -x $BPY ]] || timeout 300 python3 -m venv "$BVENV"
  timeout 900 "$BVENV/bin/pip" install -q uvloop httptools aiohttp orjson
fi
if [[ $WITH_LITELLM == 1 ]] && ! { [[ -x $LITELLM ]] && "$LVENV/bin/python" -c \
    'import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ("litellm", "fastapi", "uvicorn", "backoff")) else 1)' 2>/dev/null; }; then
  log "installing 'litellm[proxy]' into $LVENV (large; once)"
  [[ -x $LVENV/bin/python ]] || timeout 300 python3 -m venv "$LVENV"
  timeout 1800 "$LVENV/bin/pip" install -q 'litellm[proxy]'
fi

# ---- process management ---------------------------------------------------------------
# Every service runs in a session of its own (setsid), so its pid is its process group
# and stopping it stops its workers too. Stopped in reverse start order on any exit.
PIDS=(); NAMES=()
start() {  # name logfile command...
  local name="$1" logf="$2"; shift 2
  setsid "$@" > "$logf" 2>&1 < /dev/null &
  PIDS+=($!); NAMES+=("$name")
  log "started $name (pid $!): $*"
}
stop_one() {  # pid name
  local pid="$1" name="$2" i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name (pid $pid) still running after 20 s; SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  # workers left behind in the group (a supervisor that died first)
  if pgrep -g "$pid" >/dev/null 2>&1; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
}
# A long step (harness, gateway_path.py) runs in the background and is waited for, so a
# signal to this script is handled at once (bash defers traps until a foreground child ends).
STEP_PID=""
run_step() {  # logfile command...
  local logf="$1" rc=0; shift
  ( set -o pipefail; "$@" 2>&1 | tee "$logf" ) &
  STEP_PID=$!
  wait "$STEP_PID" || rc=$?
  STEP_PID=""
  return $rc
}
kill_tree() {  # pid: the process and its descendants, by pid
  local p="$1" c
  for c in $(pgrep -P "$p" 2>/dev/null); do kill_tree "$c"; done
  kill -TERM "$p" 2>/dev/null || true
}
CLEANED=0
cleanup() {
  local rc=$? i left=()
  [[ $CLEANED == 1 ]] && return 0
  CLEANED=1
  trap - INT TERM
  if [[ -n $STEP_PID ]]; then log "interrupted: stopping the running step"; kill_tree "$STEP_PID"; sleep 1; fi
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do stop_one "${PIDS[$i]}" "${NAMES[$i]}"; done
  sleep 0.5
  for i in "${!PIDS[@]}"; do
    if kill -0 "${PIDS[$i]}" 2>/dev/null || pgrep -g "${PIDS[$i]}" >/dev/null 2>&1; then left+=("${NAMES[$i]}:${PIDS[$i]}"); fi
  done
  if [[ ${#PIDS[@]} -gt 0 ]]; then
    if [[ ${#left[@]} -eq 0 ]]; then log "cleanup: all ${#PIDS[@]} services stopped (${NAMES[*]})"
    else log "cleanup: STILL RUNNING: ${left[*]}"; fi
  fi
  return $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_http() {  # url seconds pid name
  local url="$1" secs="$2" pid="$3" name="$4" i
  for (( i=0; i<secs*2; i++ )); do
    curl -sf -m 2 -o /dev/null "$url" && return 0
    kill -0 "$pid" 2>/dev/null || { echo "$name exited; see its log in $OUT/logs" >&2; return 1; }
    sleep 0.5
  done
  echo "$name not ready after ${secs}s: $url" >&2; return 1
}
wait_model() {  # port model seconds pid name : /v1/models lists the model 10 times in a row
  local port="$1" model="$2" secs="$3" pid="$4" name="$5" i ok=0
  for (( i=0; i<secs*5; i++ )); do
    if curl -sf -m 2 "http://127.0.0.1:$port/v1/models" 2>/dev/null | grep -q "\"id\":\"$model\""; then
      ok=$((ok+1)); [[ $ok -ge 10 ]] && return 0
    else ok=0; fi
    kill -0 "$pid" 2>/dev/null || { echo "$name exited; see $OUT/logs" >&2; return 1; }
    sleep 0.2
  done
  echo "$name: model $model not listed after ${secs}s" >&2; return 1
}

ports=("$REDIS_PORT" "$CONDUIT_PORT")
[[ $WORKERS == 2 ]] && ports+=("$CONDUIT_PORT_2W")
[[ $USE_HARNESS == 1 ]] && ports+=("$MOCK_PORT")
[[ $WITH_LITELLM == 1 ]] && ports+=("$L1_PORT" "$L2_PORT")
for p in "${ports[@]}"; do
  if port_busy "$p"; then echo "port $p is already in use on 127.0.0.1; free it or set the *_PORT variables (see --help)" >&2; exit 1; fi
done

{
  echo "date: $(date -Is)"; echo "host: $(uname -srm), $(nproc) cores, $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "conduit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+local changes)')"
  echo "python: $("$ROOT/.venv/bin/python" -V 2>&1); redis: $(redis-server --version | awk '{print $3}'); wrk: $(command -v wrk >/dev/null && { wrk -v 2>&1 || true; } | head -1 | awk '{print $2}' || echo none)"
  echo "harness: $([[ $USE_HARNESS == 1 ]] && echo "$HARNESS" || echo none); quick: $QUICK; workers: $WORKERS; litellm: $WITH_LITELLM"
  echo "loadavg before: $(cat /proc/loadavg)"
  # The machine may be shared: how busy it is before anything of ours runs (200% = both cores busy).
  read -r b0 t0 < <(awk '/^cpu /{i=$5+$6; s=0; for(k=2;k<=NF;k++) s+=$k; print s-i, s}' /proc/stat)
  sleep 3
  read -r b1 t1 < <(awk '/^cpu /{i=$5+$6; s=0; for(k=2;k<=NF;k++) s+=$k; print s-i, s}' /proc/stat)
  echo "machine CPU busy before start (3 s sample, 200% = all $(nproc) cores): $(awk -v a="$b0" -v b="$b1" -v x="$t0" -v y="$t1" -v n="$(nproc)" 'BEGIN{printf "%.0f%%", (b-a)/(y-x)*100*n}')"
} > "$OUT/meta.txt"

# ---- Conduit: redis + synthetic engine + gateway(s) ------------------------------------
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
start redis "$OUT/logs/redis.log" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --daemonize no --dir "$OUT/logs" --loglevel warning
REDIS_PID=${PIDS[-1]}
for i in $(seq 50); do port_busy "$REDIS_PORT" && break; sleep 0.2; done
port_busy "$REDIS_PORT" || { echo "redis did not start; see $OUT/logs/redis.log" >&2; exit 1; }

start engine "$OUT/logs/engine.log" "$CONDUIT_BIN" engine --kind synthetic --served-name mock \
  --redis-url "$REDIS_URL" --tokens 64 --log-level warning
ENGINE_PID=${PIDS[-1]}
# Without API keys (CONDUIT_AUTH=false): this measures the gateway path itself.
start conduit "$OUT/logs/conduit-1w.log" env CONDUIT_AUTH=false "$CONDUIT_BIN" gateway --host 127.0.0.1 --port "$CONDUIT_PORT" \
  --redis-url "$REDIS_URL" --workers 1 --log-level warning
GW1_PID=${PIDS[-1]}
if [[ $WORKERS == 2 ]]; then
  start conduit-2w "$OUT/logs/conduit-2w.log" env CONDUIT_AUTH=false "$CONDUIT_BIN" gateway --host 127.0.0.1 --port "$CONDUIT_PORT_2W" \
    --redis-url "$REDIS_URL" --workers 2 --log-level warning
  GW2_PID=${PIDS[-1]}
fi

# ---- the harness's mock backend and LiteLLM (as run_litellm_peer.sh starts them) ---------
if [[ $USE_HARNESS == 1 ]]; then
  start mock "$OUT/logs/mock.log" "$BPY" "$HARNESS/mock_openai.py" --port "$MOCK_PORT"
  MOCK_PID=${PIDS[-1]}
fi
if [[ $WITH_LITELLM == 1 ]]; then
  # run_litellm_peer.sh: error-level logs only, no .env loading, no cost-map download at startup
  export MOCK_API_BASE="http://127.0.0.1:$MOCK_PORT/v1" LITELLM_LOG=ERROR LITELLM_MODE=PRODUCTION \
         LITELLM_LOCAL_MODEL_COST_MAP=True
  start litellm-1w "$OUT/logs/litellm-1w.log" "$LITELLM" --config "$HARNESS/litellm.config.yaml" \
    --host 127.0.0.1 --port "$L1_PORT" --num_workers 1
  L1_PID=${PIDS[-1]}
  start litellm-2w "$OUT/logs/litellm-2w.log" "$LITELLM" --config "$HARNESS/litellm.config.yaml" \
    --host 127.0.0.1 --port "$L2_PORT" --num_workers 2
  L2_PID=${PIDS[-1]}
fi

wait_http "http://127.0.0.1:$CONDUIT_PORT/health" 60 "$GW1_PID" conduit
wait_model "$CONDUIT_PORT" mock 60 "$GW1_PID" conduit
if [[ $WORKERS == 2 ]]; then
  wait_http "http://127.0.0.1:$CONDUIT_PORT_2W/health" 60 "$GW2_PID" conduit-2w
  wait_model "$CONDUIT_PORT_2W" mock 60 "$GW2_PID" conduit-2w
fi
[[ $USE_HARNESS == 1 ]] && wait_http "http://127.0.0.1:$MOCK_PORT/health" 30 "$MOCK_PID" mock
if [[ $WITH_LITELLM == 1 ]]; then
  wait_http "http://127.0.0.1:$L1_PORT/health/liveliness" 240 "$L1_PID" litellm-1w
  wait_http "http://127.0.0.1:$L2_PORT/health/liveliness" 240 "$L2_PID" litellm-2w
  echo "litellm: $("$LVENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null || echo '?')" >> "$OUT/meta.txt"
fi
log "all targets up; results -> $OUT"

ckey=""; [[ -n ${CONDUIT_API_KEY:-} ]] && ckey=",key=$CONDUIT_API_KEY"
TARGETS=()
[[ $USE_HARNESS == 1 ]] && TARGETS+=("mock=http://127.0.0.1:$MOCK_PORT/v1")
if [[ $WITH_LITELLM == 1 ]]; then
  TARGETS+=("litellm-1w=http://127.0.0.1:$L1_PORT/v1,key=$LITELLM_KEY" "litellm-2w=http://127.0.0.1:$L2_PORT/v1,key=$LITELLM_KEY")
fi
TARGETS+=("conduit=http://127.0.0.1:$CONDUIT_PORT/v1$ckey")
[[ $WORKERS == 2 ]] && TARGETS+=("conduit-2w=http://127.0.0.1:$CONDUIT_PORT_2W/v1$ckey")

# ---- 1. the harness ---------------------------------------------------------------------
HARNESS_RC=skipped
if [[ $USE_HARNESS == 1 ]]; then
  HARGS=(--python "$BPY" --backend-port "$MOCK_PORT" -o "$OUT/harness" -r "$REPEATS")
  d=15; w=5; sd=20; sw=5
  if [[ $QUICK == 1 ]]; then HARGS+=(-d 5 -w 2 --stream-duration 8 --stream-warmup 2); d=5; w=2; sd=8; sw=2; fi
  [[ $WITH_LITELLM == 1 ]] && HARGS+=(--peer litellm-2w)
  for t in "${TARGETS[@]}"; do HARGS+=(-t "$t"); done
  if [[ -z $HARNESS_TIMEOUT ]]; then
    # per target and repeat: warmup + 4 wrk runs + 3 stream runs (+ drain) + pauses; doubled; + 5 min
    per=$(( w + 2 + 4*(d+2+2) + 3*(sw+sd+2+10) + 10 ))
    HARNESS_TIMEOUT=$(( 2 * per * ${#TARGETS[@]} * REPEATS + 300 ))
  fi
  log "harness: peer_overhead.sh (limit ${HARNESS_TIMEOUT}s) targets: ${TARGETS[*]}"
  HARNESS_RC=0
  run_step "$OUT/logs/harness.log" timeout --kill-after=30 "$HARNESS_TIMEOUT" \
    bash "$HARNESS/peer_overhead.sh" "${HARGS[@]}" "${EXTRA[@]}" || HARNESS_RC=$?
  log "harness exit status: $HARNESS_RC"
  if [[ $WITH_LITELLM == 1 && -f $OUT/harness/results.jsonl ]]; then
    "$BPY" "$HARNESS/report.py" "$OUT/harness/results.jsonl" --baseline mock --peer litellm-1w \
      > "$OUT/harness/report-vs-litellm-1w.txt" 2>&1 || true
  fi
fi

# ---- 2. gateway_path.py (the project's own load generator) --------------------------------
GP_RC=skipped
if [[ $USE_GP == 1 ]]; then
  GP_TARGETS=()
  [[ $USE_HARNESS == 1 ]] && GP_TARGETS+=(-t "mock=http://127.0.0.1:$MOCK_PORT/v1")
  GP_TARGETS+=(-t "conduit=http://127.0.0.1:$CONDUIT_PORT/v1$ckey")
  [[ $WORKERS == 2 ]] && GP_TARGETS+=(-t "conduit-2w=http://127.0.0.1:$CONDUIT_PORT_2W/v1$ckey")
  GP_ARGS=(--cpu-pid "engine=$ENGINE_PID" --cpu-pid "redis=$REDIS_PID" -o "$OUT/gateway_path.json"
           --report "$OUT/gateway_path.txt")
  gp_limit=$(( (${#GP_TARGETS[@]} / 2) * (4 * 30 + 60) + 300 ))
  if [[ $QUICK == 1 ]]; then GP_ARGS+=(--quick); gp_limit=$(( (${#GP_TARGETS[@]} / 2) * (4 * 12 + 30) + 200 )); fi
  log "gateway_path.py (limit ${gp_limit}s)"
  GP_RC=0
  run_step "$OUT/logs/gateway_path.log" timeout --kill-after=15 "$gp_limit" \
    "$BPY" "$BENCH_DIR/gateway_path.py" "${GP_TARGETS[@]}" "${GP_ARGS[@]}" || GP_RC=$?
  log "gateway_path.py exit status: $GP_RC"
fi

# ---- 3. images.py (diffusers; starts and stops its own processes) --------------------------
IMG_RC=skipped
if [[ $WITH_IMAGES == 1 ]]; then
  IMG_ARGS=(-o "$OUT/images.json" --workdir "$HOME_DIR/images")
  [[ $QUICK == 1 ]] && IMG_ARGS+=(--repeats 1)
  log "images.py (limit 1200s)"
  IMG_RC=0
  run_step "$OUT/logs/images.log" timeout --kill-after=30 1200 \
    "$ROOT/.venv/bin/python" "$BENCH_DIR/images.py" "${IMG_ARGS[@]}" || IMG_RC=$?
  log "images.py exit status: $IMG_RC"
fi

# ---- report --------------------------------------------------------------------------------
echo "loadavg after: $(cat /proc/loadavg)" >> "$OUT/meta.txt"
{
  echo "# Conduit gateway-path benchmark   ($OUT)"
  cat "$OUT/meta.txt"
  echo "harness exit: $HARNESS_RC; gateway_path.py exit: $GP_RC; images.py exit: $IMG_RC"
  if [[ -f $OUT/harness/report.txt ]]; then
    echo; echo "################ harness (peer_overhead.sh; wrk + stream_client.py) ################"
    cat "$OUT/harness/report.txt"
  fi
  if [[ -f $OUT/harness/report-vs-litellm-1w.txt ]]; then
    echo; echo "################ harness, ratios vs litellm-1w ################"
    sed -n '/Ratio vs peer/,/^$/p' "$OUT/harness/report-vs-litellm-1w.txt"
    sed -n '/Streaming vs/,/^$/p' "$OUT/harness/report-vs-litellm-1w.txt"
  fi
  if [[ -f $OUT/gateway_path.txt ]]; then
    echo; echo "################ benchmarks/gateway_path.py ################"
    cat "$OUT/gateway_path.txt"
  fi
  if [[ $WITH_IMAGES == 1 && -f $OUT/logs/images.log ]]; then
    echo; echo "################ benchmarks/images.py ################"
    sed -n '/^# images benchmark/,$p' "$OUT/logs/images.log" | grep -v -E 'Loading|it/s\]|torchvision'
  fi
  echo; echo "################ targets ################"
  TARGET_ARGS=()
  [[ -f $OUT/harness/results.jsonl ]] && TARGET_ARGS+=(--harness "$OUT/harness/results.jsonl")
  [[ -f $OUT/gateway_path.json ]] && TARGET_ARGS+=(--gateway-path "$OUT/gateway_path.json")
  "$BPY" "$BENCH_DIR/targets.py" "${TARGET_ARGS[@]}" || true
  echo; echo "################ service logs (errors) ################"
  for f in "$OUT"/logs/*.log; do
    case "$(basename "$f")" in harness.log|gateway_path.log) continue ;; esac
    n=$(grep -c -E 'ERROR|Traceback|Exception|CRITICAL' "$f" || true)
    echo "$(basename "$f"): $n error/traceback lines"
    [[ $n -gt 0 ]] && grep -m 5 -E 'ERROR|Traceback|Exception|CRITICAL' "$f" | cut -c1-240 | sed 's/^/    /'
  done
} > "$OUT/report.txt" 2>&1
echo
cat "$OUT/report.txt"
log "report: $OUT/report.txt"
