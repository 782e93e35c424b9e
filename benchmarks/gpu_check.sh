#!/usr/bin/env bash
# Issue #22 on one NVIDIA GPU, in under 8 minutes: step times of TVLARS, LARS and LAMB (the
# skip decision kept on the device) against torch's fused SGD and AdamW on ResNet-50, ViT-B/16
# and a 1,000-tensor list; the host syncs and kernel launches of one step (profiler and
# torch.cuda.set_sync_debug_mode("error")); and the CUDA-graph capture test. Ends with ONE
# summary table. Every log lands in $OUT (default benchmarks/results/gpu_check); a failing
# part is recorded and the others still run.
#
#   benchmarks/gpu_check.sh               # on the GPU machine
#   benchmarks/gpu_check.sh --cpu-smoke   # the same plumbing on CPU, tiny repeats (no GPU)
#
# PYTHON picks the interpreter (default: .venv/bin/python if there, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

case "${1:-}" in
    "") DEVICE=cuda REPEATS=${REPEATS:-50} ;;
    --cpu-smoke) DEVICE=cpu REPEATS=${REPEATS:-2} ;;
    *) echo "usage: $0 [--cpu-smoke]" >&2; exit 2 ;;
esac
OUT="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT"
: > "$OUT/status.tsv"

BASELINES=("SGD(fused)" "AdamW(fused)")
OURS=("TVLARS(device decision)" "LARS(device decision)" "LAMB(device decision)")

# run NAME CMD...: CMD's output to the terminal and $OUT/NAME.log, its exit status to
# $OUT/status.tsv; never stops the script.
run() {
    local name=$1 rc=0
    shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
    printf '%s\t%s\n' "$name" "$rc" >> "$OUT/status.tsv"
}

START=$SECONDS
{
    date -u
    git rev-parse --short HEAD 2>/dev/null || true
    if [ "$DEVICE" = cuda ]; then nvidia-smi -L; else echo "cpu smoke: no GPU"; fi
    "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "| cuda available", torch.cuda.is_available())
try:
    import torchvision; print("torchvision", torchvision.__version__)
except ImportError:
    print("torchvision missing: pip install torchvision")
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
EOF
} 2>&1 | tee "$OUT/machine.log"

# 1. Step time on each set of shapes, ratios to torch's fused steps.
for model in resnet50 vit_b_16 list1000; do
    run "step_time_$model" "$PYTHON" benchmarks/step_time.py --device "$DEVICE" \
        --model "$model" --repeats "$REPEATS" --clock wall \
        --optimizers "${BASELINES[@]}" "${OURS[@]}" --baselines "${BASELINES[@]}" \
        --json "$OUT/step_time_$model.json"
done

# 1b. fused=True on ResNet-50: the per-piece scale as one compiled graph per group (its first
#     step compiles with Triton; the steady state is what the table shows).
run step_time_resnet50_fused "$PYTHON" benchmarks/step_time.py --device "$DEVICE" \
    --model resnet50 --repeats "$REPEATS" --clock wall \
    --optimizers "${BASELINES[@]}" "TVLARS(fused, device decision)" "LAMB(fused, device decision)" \
    --baselines "${BASELINES[@]}" --json "$OUT/step_time_resnet50_fused.json"

# 2. Host syncs and kernel launches of one step (profiler), and steady-state steps under
#    set_sync_debug_mode("error") (CUDA only).
run check_syncs "$PYTHON" benchmarks/step_time.py --device "$DEVICE" --model resnet50 \
    --repeats 1 --check-syncs --optimizers "${BASELINES[@]}" "${OURS[@]}" \
    --baselines "${BASELINES[@]}" --json "$OUT/check_syncs.json"

# 3. The captured step replays like the eager one (skips without a GPU).
run graph_capture "$PYTHON" -m pytest -q -rs tests/test_graph_capture.py

# 4. One table.
"$PYTHON" - "$OUT" "$((SECONDS - START))" <<'EOF' | tee "$OUT/summary.md"
import json, re, sys
from pathlib import Path

out, elapsed = Path(sys.argv[1]), sys.argv[2]
status = dict(line.split("\t") for line in (out / "status.tsv").read_text().splitlines())
runs = {}
for model in ("resnet50", "resnet50_fused", "vit_b_16", "list1000"):
    path = out / f"step_time_{model}.json"
    if path.exists():
        runs[model] = json.loads(path.read_text())
syncs = json.loads((out / "check_syncs.json").read_text()) if (out / "check_syncs.json").exists() else None

names = list(dict.fromkeys(n for r in runs.values() for n in r["optimizers"]))
first = next(iter(runs.values()), None)
device = f"{first['device']} ({first['machine']}), torch {first['torch']}" if first else "?"
print(f"\n## gpu_check summary: {device}, {elapsed} s")
print("Cells: median step ms (x SGD(fused), x AdamW(fused), medians of per-round ratios).")
head = "| optimizer | " + " | ".join(f"{m} ({r['tensors']} tensors)" for m, r in runs.items())
head += " | launches / memcpy per step (resnet50) | stream syncs / device syncs / item (resnet50) |"
print(head)
print("|---|" + "---:|" * len(runs) + "---:|---|")
for name in names:
    cells = []
    for run in runs.values():
        o = run["optimizers"].get(name)
        if o is None:
            cells.append("-")
            continue
        ratios = ", ".join(f"x{o['ratios'][b]:.2f}" for b in run["baselines"])
        cells.append(f"{o['median_ms']:.2f} ({ratios})")
    s = (syncs or {}).get("optimizers", {}).get(name, {})
    counts = s.get("syncs") or {}
    launches = (
        f"{counts['kernel launches']} / {counts['cudaMemcpyAsync']}"
        if "kernel launches" in counts else "n/a (cpu)" if counts else "-"
    )
    sync_keys = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense")
    reads = " / ".join(str(counts[k]) for k in sync_keys) if counts else "-"
    verdict = s.get("sync_debug") or ("n/a (cpu)" if counts else "-")
    print(f"| {name} | " + " | ".join(cells) + f" | {launches} | {reads}; debug mode: {verdict} |")

log = (out / "graph_capture.log").read_text() if (out / "graph_capture.log").exists() else ""
tail = [l for l in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", l)]
print(f"\nCUDA-graph capture test: {tail[-1].strip('= ') if tail else 'no result'}")
failed = [n for n, rc in status.items() if rc != "0"]
print("Failed parts: " + (", ".join(f"{n} (rc {status[n]}, see {n}.log)" for n in failed) or "none"))
print(f"Logs: {out}/")
EOF
