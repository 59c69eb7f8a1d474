#!/usr/bin/env bash
# The device check: every model family's exactness check and the latency, live and serve benchmarks on one
# machine, each writing JSON into $OUT. Meant for a CUDA machine; runs anywhere with DEVICE=cpu.
#
#   bash scripts/device-check.sh                        # CUDA, full sizes; stops within TOTAL_S (540 s) whatever happens
#   DEVICE=cpu QUICK=1 bash scripts/device-check.sh     # tiny sizes on the CPU (183 s on 2 busy cores): proves the script works
#
# Settings (environment):
#   DEVICE   cuda (default), cuda:N or cpu: passed as --device to every command
#   QUICK    1: tiny models and short runs (a check of the script, not figures to report); default 0
#   OUT      folder for the JSON results, logs and summary.txt (default: out)
#   TOTAL_S  seconds the whole script may take (default 540); every step runs under `timeout` within what is left
#   PYTHON   the interpreter with streamvlm installed (default: .venv/bin/python; created as README says when missing)
#
# Every step prints one line: its name, ok / FAILED (exit code) / TIMEOUT / SKIPPED, its seconds and its result file;
# the same lines end up in $OUT/summary.txt. The script exits 0 when every step passed, 1 otherwise.
# A step that fails does not stop the others. Nothing is downloaded except, when the virtualenv is missing, its packages.
set -uo pipefail

DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
OUT=${OUT:-out}
TOTAL_S=${TOTAL_S:-540}
PYTHON=${PYTHON:-.venv/bin/python}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

say() { echo "device-check: $*" | tee -a "$SUMMARY"; }

if [ ! -x "$PYTHON" ]; then
    echo "device-check: no $PYTHON: creating the virtualenv as README does"
    python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e . || { echo "device-check: cannot create .venv"; exit 1; }
    PYTHON=.venv/bin/python
fi

if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi | tee "$OUT/nvidia-smi.txt"
else
    echo "device-check: no nvidia-smi on this machine" | tee "$OUT/nvidia-smi.txt"
fi

# figures FILE: the few numbers of a result JSON worth a glance (the JSON has them all).
figures() {
    "$PYTHON" - "$1" 2> /dev/null << 'PY' || true
import json, sys

r = json.load(open(sys.argv[1]))
def g(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)
if "checks" in r:  # check-model: one entry per dtype
    print(" ".join(f"[{c['dtype']}: diff {g(c['max_abs_logit_diff'])}"
                   + (f", batched decode {g(c['batched_decode_diff'])}" if c.get("batched_decode_diff") is not None else "")
                   + f" <= {g(c['tolerance'])} {'ok' if c['ok'] else 'NOT OK'}]" for c in r["checks"]))
else:
    head = " ".join(f"{k}={g(r[k])}" for k in ("device", "dtype", "gpu") if r.get(k) is not None)
    if r.get("benchmark") == "latency":
        head += " ttft " + ", ".join(f"{x['frames']} frames {g(x['ttft_stream_s'])} s" for x in r.get("results", []))
    elif r.get("benchmark") == "live":
        head += f" lag p95 {g(r.get('lag_p95_s'))} s, ttft under load {g(r.get('ttft_load_s'))} s"
    elif r.get("benchmark") == "serve":
        head += " | " + "; ".join(f"{x.get('engine', '?')} x{x['sessions']}: {g(x.get('frames_read_per_s'))} frames/s, "
                                  f"lag p95 {g(x.get('lag_p95_s'))} s, ttft p95 {g(x.get('ttft_p95_s'))} s, "
                                  f"{g(x.get('vision_batch_mean'))} frames per vision forward, {g(x.get('decode_batch_mean'))} steps per decode forward"
                                  for x in r.get("runs", []))
    print(head)
PY
}

# step NAME CAP_S RESULT -- COMMAND...: run COMMAND under `timeout` (CAP_S, or what is left of TOTAL_S if less),
# its output in $OUT/NAME.log, and print one line. RESULT is the file the command writes (for the summary).
step() {
    local name=$1 cap=$2 result=$3
    shift 4
    local left=$((TOTAL_S - ($(date +%s) - START)))
    if [ "$left" -lt 10 ]; then
        say "$(printf '%-34s SKIPPED (the %ss budget is spent)' "$name" "$TOTAL_S")"
        FAILED=1
        return
    fi
    local limit=$((cap < left ? cap : left))
    local t0 rc
    rm -f "$result"  # a result left by an earlier run must not pass for this one
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local took=$(($(date +%s) - t0)) status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMEOUT after ${limit}s"
        FAILED=1
    elif [ "$rc" -ne 0 ]; then
        status="FAILED (exit $rc; see $OUT/$name.log)"
        FAILED=1
    fi
    local figures=""
    if [ -s "$result" ]; then
        figures=$(figures "$result")
    fi
    say "$(printf '%-34s %-8s %4ss  %s %s' "$name" "$status" "$took" "$result" "$figures")"
}

SVLM=("$PYTHON" -m streamvlm.cli)
step env 120 "$OUT/env.json" -- "$PYTHON" -c "
import json, platform, sys, torch, transformers
from streamvlm.models.device import choose_precision
p = choose_precision('$DEVICE', 'auto')
info = {'python': sys.version.split()[0], 'torch': torch.__version__, 'transformers': transformers.__version__,
        'cuda_available': torch.cuda.is_available(), 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        'machine': platform.machine(), **p.to_dict()}
json.dump(info, open('$OUT/env.json', 'w'), indent=2)
print(json.dumps(info))"

# Exactness: streamed logits == one offline prefill, per family, in float32 and in the dtype auto picks.
if [ "$QUICK" = 1 ]; then
    MODELS=$("$PYTHON" -c "from streamvlm.models.tiny import PRESETS; print(' '.join(m for m in PRESETS if m.startswith('tiny-')))")
    CHECK_ARGS=(--frames 2 --max-new-tokens 4)
else
    MODELS=$("$PYTHON" -c "from streamvlm.models.tiny import PRESETS; print(' '.join(PRESETS))")
    CHECK_ARGS=(--frames 8 --max-new-tokens 8)
fi
for model in $MODELS shapeworld; do
    # check-model prints its JSON on stdout: keep it apart from the log
    step "check-model-$model" 180 "$OUT/check-model-$model.json" -- bash -c \
        "\"\$@\" > '$OUT/check-model-$model.json'" _ "${SVLM[@]}" check-model "$model" --device "$DEVICE" --dtype float32,auto "${CHECK_ARGS[@]}"
done

if [ "$QUICK" = 1 ]; then
    BIG=tiny-smolvlm
    LAT=(--frames 2 --repeats 1 --no-naive --quiet)
    LIVE=(--duration 5 --fps 2)
    SERVE=(--sessions 1,2 --engine lock,scheduler --fps 1 --duration 5)
    MANY=()
else
    BIG=smolvlm-256m-random
    LAT=(--frames 16,64,128 --repeats 3 --no-naive --quiet)
    LIVE=(--duration 30 --fps 2)
    SERVE=(--sessions 1,2,4,8 --engine lock,scheduler --fps 1 --duration 20)
    MANY=(--sessions 16,32,64 --engine scheduler --fps 1 --duration 20)
fi
for dtype in auto float32; do
    step "bench-latency-$dtype" 150 "$OUT/bench-latency-$dtype.json" -- \
        "${SVLM[@]}" bench latency --model "$BIG" --device "$DEVICE" --dtype "$dtype" "${LAT[@]}" --json "$OUT/bench-latency-$dtype.json"
done
step bench-serve 240 "$OUT/bench-serve.json" -- \
    "${SVLM[@]}" bench serve --model "$BIG" --device "$DEVICE" --dtype auto "${SERVE[@]}" --json "$OUT/bench-serve.json"
step bench-live 90 "$OUT/bench-live.json" -- \
    "${SVLM[@]}" bench live --model "$BIG" --device "$DEVICE" --dtype auto "${LIVE[@]}" --json "$OUT/bench-live.json"
if [ "${#MANY[@]}" -gt 0 ]; then  # how many 1 fps streams one device holds
    step bench-serve-many 150 "$OUT/bench-serve-many.json" -- \
        "${SVLM[@]}" bench serve --model "$BIG" --device "$DEVICE" --dtype auto "${MANY[@]}" --json "$OUT/bench-serve-many.json"
fi

if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi >> "$OUT/nvidia-smi.txt"
fi
say "done in $(($(date +%s) - START))s on DEVICE=$DEVICE QUICK=$QUICK; results in $OUT/"
exit $FAILED
