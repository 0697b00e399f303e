#!/usr/bin/env bash
# Every GPU speed figure of the project from one command, each benchmark under its own time limit
# so that one that hangs or fails leaves the others' figures:
#   bash haodiff_model/bench/gpu_suite.sh [LOG_DIR]
# 1. stage 1: our training step vs the fp32 explicit-attention baselines; DPG + prompt embedders
#    latency; then the torch.profiler tables of both (where the time goes)
# 2. restore: bf16 batch 1 and 8, and the official-equivalent fp32 batch 1 (random SD2.1-base weights)
# 3. synthesis on all cores: MediaPipe; then a random Sapiens-0.3B-sized TorchScript on the GPU:
#    its throughput alone, then end to end with 4 workers and with all cores (one segmentation process either way)
# 4. stage 2: one training step at batch 2 with the SDXL discriminator (random weights)
# One run on an H200 took 334 s with the first version of this script (no profile, one Sapiens run).
# SMOKE=1 runs the same commands on tiny sizes (a CPU check of the script, numbers meaningless).
set -uo pipefail
cd "$(dirname "$0")/../.."
LOG=${1:-runs/gpu_suite}
mkdir -p "$LOG"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
CORES=$(nproc)
SAPIENS=/tmp/sapiens_0.3b_random_torchscript.pt2
if [[ "${SMOKE:-0}" == 1 ]]; then
    GPU_ARGS=(); RESTORE_ARGS=(--bench-size 64 --bench-batches 1 --bench-repeats 1)
    STANDIN_ARGS=(--width 64 --depth 2 --heads 4 --head-channels 16); OSD_ARGS=(--steps 1 --warmup 0)
    DATA_ARGS=(--samples 2 --end-to-end-samples 8); SAPIENS_E2E=8; T=4
else
    GPU_ARGS=(--steps 6 --warmup 2 --runs 30)
    RESTORE_ARGS=(--precision bf16 --bench-batches 1,8 --bench-repeats 3 --bench-official)
    STANDIN_ARGS=(--device cuda); OSD_ARGS=(--steps 3 --warmup 1)
    DATA_ARGS=(--samples 5 --end-to-end-samples 640); SAPIENS_E2E=160; T=1
fi

section() {  # section NAME SECONDS COMMAND...: run it under a limit, keep its output, report how it ended
    local name=$1 limit=$(( $2 * T )); shift 2
    echo "=== $name (limit ${limit} s) $(date +%T)"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOG/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $(( SECONDS - start )) s"
}

echo "host: $CORES cores; $($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

section stage1 150 $PY -m haodiff_model.bench.gpu "${GPU_ARGS[@]}"
section profile 110 $PY -m haodiff_model.bench.gpu --profile
section restore 90 $PY -m haodiff_model.bench.restore "${RESTORE_ARGS[@]}"
section synth_mediapipe 60 $PY -m haodiff_data.cli bench --workers "$CORES" "${DATA_ARGS[@]}"
section sapiens_standin 40 $PY -m haodiff_data.segment.sapiens_standin "$SAPIENS" "${STANDIN_ARGS[@]}"
DEVICE=cuda; [[ "${SMOKE:-0}" == 1 ]] && DEVICE=cpu
SEG=(--segmenter sapiens --checkpoint "$SAPIENS" --device "$DEVICE")
section sapiens_throughput 60 $PY -m haodiff_data.cli bench "${SEG[@]}" --samples 3 --end-to-end-samples 0
for workers in 4 "$CORES"; do
    section "synth_sapiens_$workers" 90 $PY -m haodiff_data.cli bench "${SEG[@]}" --samples 1 \
        --end-to-end-samples "$SAPIENS_E2E" --workers "$workers"
done
rm -f "$SAPIENS"
section stage2 100 $PY -m haodiff_model.bench.osd --disc sdxl "${OSD_ARGS[@]}"
