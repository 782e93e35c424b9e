#!/usr/bin/env bash
# Reproduce every table of benchmarks/RESULTS.md. Run from anywhere; outputs go to
# benchmarks/results/ (the logs hold the tables as printed). On 2 CPU cores: step cost ~3 min,
# communication ~4 min, accuracy study ~10 CPU-hours (resumable: rerun to continue it; see
# RESULTS.md for running it niced in the background, a share per session).
#
#   benchmarks/run_all.sh            # CPU
#   DEVICE=cuda benchmarks/run_all.sh  # one GPU: step cost and the accuracy study on cuda,
#                                      # communication still on gloo CPU ranks (see RESULTS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cpu}
OUT=benchmarks/results
mkdir -p "$OUT"
{ date -u; uname -srm; nproc; "$PY" -c 'import torch; print("torch", torch.__version__)'; } \
    | tee "$OUT/machine.txt"
if [ "$DEVICE" = cuda ]; then nvidia-smi | tee -a "$OUT/machine.txt"; fi

# 1. Step cost (ResNet-50 and ViT-B/16 parameter shapes): a cold compile (caches off), then
# both allocator settings with a warm cache; the FSDP2 step on 2 ranks with its profile.
mkdir -p "$OUT/step_cost"
for model in resnet50 vit_b_16; do
    "$PY" benchmarks/step_time.py --model "$model" --threads 2 --repeats 5 --malloc retain \
        --device "$DEVICE" --no-compile-cache --inductor-startup \
        --optimizers 'SGD(foreach)' 'TVLARS(fused)' 'LARS(fused)' \
        | tee "$OUT/step_cost/step_time_${model}_cold.log"
    for malloc in default retain; do
        "$PY" benchmarks/step_time.py --model "$model" --threads 2 --repeats 15 \
            --malloc "$malloc" --device "$DEVICE" \
            | tee "$OUT/step_cost/step_time_${model}_${malloc}.log"
    done
done
# A channels-last model (conv weights and their gradients NHWC), both allocator settings.
for malloc in default retain; do
    "$PY" benchmarks/step_time.py --model resnet50 --threads 2 --repeats 15 --malloc "$malloc" \
        --device "$DEVICE" --channels-last \
        --optimizers 'SGD(foreach)' 'AdamW(foreach)' 'SGD(fused)' TVLARS LARS LAMB \
        'TVLARS(fused)' 'LAMB(fused)' 'TVLARS(device decision)' 'TVLARS(fused, device decision)' \
        | tee "$OUT/step_cost/step_time_resnet50_channels_last_${malloc}.log"
done
"$PY" benchmarks/sharded_step.py --ranks 2 --repeats 15 --profile \
    | tee "$OUT/step_cost/sharded_step_resnet50.log"

# 2. Communication cost: FSDP2 and ZeRO-2 on 2 and 4 gloo CPU ranks.
"$PY" benchmarks/comm_bytes.py --steps 6 --out "$OUT/comm_bytes.json" | tee "$OUT/comm_bytes.log"

# 3. Soak (long-run stability), when present.
if [ -f benchmarks/soak.py ]; then
    "$PY" benchmarks/soak.py | tee "$OUT/soak.log"
fi

# 4. Large-batch accuracy study v2 on Fashion-MNIST (results.jsonl, report.md and plots under
# $OUT/accuracy_v2; the defaults are the CPU study of RESULTS.md).
mkdir -p "$OUT/accuracy_v2"
"$PY" benchmarks/accuracy_study.py --device "$DEVICE" | tee -a "$OUT/accuracy_v2/study.log"
