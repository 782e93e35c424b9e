#!/usr/bin/env bash
# Issue #25, item 5: the accuracy study at 16K on ONE GPU, in one call of at most 10 minutes.
# Fashion-MNIST (54,000 train / 6,000 validation / 10,000 test), global batch 16384 with
# full-batch BatchNorm (micro-batch = global batch), ResNet-18 with the authors' stem
# (torchvision's 7x7 stride-2 conv + max-pool, `--stem imagenet`: tvlars_scale/recipes/models.py),
# 100 epochs (300 steps):
#   seed 0:  TVLARS LR 17, 34, 68; WA-LARS LR 8.5, 17, 34; LAMB LR 0.085   (7 runs)
#   then TVLARS and WA-LARS at their LR chosen on validation, seeds 1 and 2   (4 runs)
# Every run is one `benchmarks/accuracy_study.py` run (the shipped recipe in its own process,
# results.jsonl, report.md), one at a time, most informative first:
#   TVLARS 34, WA-LARS 17, LAMB 0.085 (each the middle of its grid, and the LR the CPU study
#   chose at 16K), then the upper edges (TVLARS 68, WA-LARS 34), the lower edges (17, 8.5),
#   then seed 1, then seed 2 of each winner.
# The study is resumable: a finished run (a line in results.jsonl) is never run again.
#
#   benchmarks/gpu_study.sh --stage-data   # HERE, before each device call: Fashion-MNIST into
#                                          # .data/fashion-mnist (git-ignored, ~30 MB) + commit
#   benchmarks/gpu_study.sh                # on the GPU machine (the device call below)
#   benchmarks/gpu_study.sh --plan         # the order of the runs still to do, and --status
#   benchmarks/gpu_study.sh --cpu-smoke    # the same plumbing on CPU, tiny (tests/test_benchmarks_smoke.py)
#
# The device call (paste as is; run --stage-data here first):
#   run(command="bash benchmarks/gpu_study.sh", carry=[".data"], timeout_s=600)
# To resume in a later session, put what came back into the checkout (FILES = files_at):
#   cp FILES/results.jsonl FILES/sessions.jsonl FILES/report.md benchmarks/results/gpu_study/
#   cat FILES/study.log >> benchmarks/results/gpu_study/study.log
# and make the same call again: it skips the finished runs. FILES also holds machine.log (the
# versions and the GPU), gpu.csv (nvidia-smi every 5 s: memory used, utilization, power),
# curves.png and lnr.png (8 files: the device returns at most 8, two folders deep).
#
# Time (estimated; nothing has run on a GPU yet): torch.utils.flop_counter gives 0.20 GFLOP to
# train on one 28x28 image with this stem (7x7 maps after it) and ~0.07 to evaluate one, so ~1.0
# PFLOP per run (300 steps x 16384 images, 21 evaluations of 16,000 images). Small maps keep
# the GPU far from its peak: at 30-75 TFLOP/s that is 15-35 s, plus ~15 s to start a run, so
# the 11 runs take ~6-9 minutes, inside one call. Before starting a run the script checks that
# it can finish inside GPU_STUDY_BUDGET_S (550 s, counted from the script's start), taking the
# longest run so far (this call's, or results.jsonl's + 10 s) as the estimate
# (GPU_STUDY_RUN_EST_S = 180 s before any has finished). A run still going at GPU_STUDY_HARD_S
# (565 s) is stopped (SIGTERM), so that the report and the copies to $OUT happen inside the
# device's 600 s; it keeps its checkpoints (every 10 epochs; runs/ is git-ignored), so a rerun
# on the same warm machine resumes it, and a fresh machine starts it again. The finished runs
# are copied to $OUT after each run, so even a killed call returns them. A call that names no
# kind may land on an H200: the same settings run there; compare run times only within one
# kind (machine.log names the GPU).
#
# GPU_STUDY_STEM=cifar swaps in the small-image stem (3x3 stride-1 conv, no max-pool; 2.73
# GFLOP per training image, 14x more: ~2.5 min per run, 3-4 calls for the 11 runs) in its own
# folder, since a run's tag does not name the stem. Its activations at batch 16384 (0.91 M
# saved values per image, measured on CPU with saved_tensors_hooks: 27.9 GiB in bf16, 55.9 GiB
# in fp32, ~65-70 GiB at the peak) only fit the H100's 78 GiB comfortably in bf16, so it runs
# with --mixed-precision bf16 (autocast: weights, gradients and the optimizers stay fp32). The
# default stem needs ~4 GiB in fp32 and runs in fp32, as the CPU study does. Both keep
# --channels-last (what tensor-core convolutions want) and one run at a time (--workers 1).
# Evaluation every 5 epochs (--eval-every 15 steps, 21 points per curve).
#
# Data: the GPU machine has no internet and no Debian dataset, so --stage-data copies the four
# *-ubyte.gz files of $FASHION_MNIST_SRC (/usr/share/datasets/fashion-mnist) into
# .data/fashion-mnist (git-ignored), which the call carries (30 MB of the 64 MiB a call takes),
# and records the commit in .data/commit (the code version sessions.jsonl names, where the
# device's copy has no git). The runs read it through the recipes' --data-dir.
#
# Python: the GPU machine's python3 has torch 2.11, torchvision 0.26, accelerate 1.15,
# matplotlib, scikit-learn and tqdm (.library/device/KINDS.md), all this project needs; the
# project itself comes by PYTHONPATH. A missing package stops the script at once with its name:
# carry it as a wheel (.library/device/README.md, "a Python package missing there").
#
# Settings (environment): PYTHON (default .venv/bin/python if there, else python3),
# GPU_STUDY_DIR (the study folder: benchmarks/results/gpu_study, gpu_study_cifar with
# GPU_STUDY_STEM=cifar; smoke: $TMPDIR/gpu_study_smoke), GPU_STUDY_STEM (imagenet),
# GPU_STUDY_DATA (.data/fashion-mnist), GPU_STUDY_SEEDS ("0 1 2"), GPU_STUDY_BUDGET_S,
# GPU_STUDY_HARD_S, GPU_STUDY_RUN_EST_S, OUT (where logs and copies go; default the study
# folder). Exit status: 0 done or out of budget, 1 a run failed (its log's tail is printed and
# no other run starts), 2 bad use or no data, 3 an environment without CUDA or a package.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SRC="${FASHION_MNIST_SRC:-/usr/share/datasets/fashion-mnist}"
DATA="${GPU_STUDY_DATA:-.data/fashion-mnist}"
FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz
    t10k-labels-idx1-ubyte.gz)

have_data() { [ -f "$1/${FILES[0]}" ] && [ -f "$1/${FILES[2]}" ]; }

stage_data() {
    local f commit
    mkdir -p "$DATA"
    for f in "${FILES[@]}"; do
        [ -f "$SRC/$f" ] || {
            echo "$SRC/$f not found: apt-get install dataset-fashion-mnist, or set FASHION_MNIST_SRC" >&2
            exit 2
        }
        cp -p "$SRC/$f" "$DATA/"
    done
    commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
    if [ -n "$(git status --porcelain --untracked-files=no -- tvlars_scale launch benchmarks 2>/dev/null)" ]; then
        commit="$commit (modified)"
    fi
    echo "$commit" > "$(dirname "$DATA")/commit"
    local ignored=0
    git check-ignore -q "$DATA/${FILES[0]}" 2> /dev/null || ignored=$?
    if [ "$ignored" = 1 ]; then  # 128: not in this checkout
        echo "warning: $DATA is not git-ignored: the device call carries only ignored paths" >&2
    fi
    echo "staged $(du -sh "$DATA" | cut -f1) in $DATA (commit $commit)"
    echo "device call: run(command=\"bash benchmarks/gpu_study.sh\", carry=[\"$(dirname "$DATA")\"], timeout_s=600)"
}

STEM="${GPU_STUDY_STEM:-imagenet}" SUFFIX= PRECISION=no
case "$STEM" in
    imagenet) ;;
    cifar) SUFFIX=_cifar PRECISION=bf16 ;;  # its own folder: a run's tag does not name the stem
    *) echo "GPU_STUDY_STEM=$STEM: expected imagenet or cifar" >&2; exit 2 ;;
esac
MODE=gpu
case "${1:-}" in
    "") ;;
    --cpu-smoke) MODE=smoke ;;
    --plan) MODE=plan ;;
    --stage-data) stage_data; exit 0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--stage-data | --plan | --cpu-smoke]" >&2; exit 2 ;;
esac

if [ "$MODE" = smoke ]; then
    # Same plumbing, tiny: a 4-channel small CNN, 2 steps of 128 images, 2 LRs of one optimizer.
    DEVICE=cpu THREADS=1 BATCH=128 EPOCHS=1 MODEL=small-cnn-s2 WIDTH=4 TRAIN_SUBSET=256
    TEST_SUBSET=64 CKPT_EVERY=1 EVAL_EVERY=1 SEEDS_DEFAULT="0"
    OPTIMIZERS="tvlars" GRIDS="tvlars=1,2" SEED_OPTIMIZERS="tvlars"
    STUDY_DIR="${GPU_STUDY_DIR:-${TMPDIR:-/tmp}/gpu_study_smoke}"
    BUDGET_S="${GPU_STUDY_BUDGET_S:-300}" HARD_S="${GPU_STUDY_HARD_S:-400}"
    RUN_EST_S="${GPU_STUDY_RUN_EST_S:-0}"
    if ! have_data "$DATA" && have_data "$SRC"; then DATA=$SRC; fi  # no need to stage on CPU
else
    DEVICE=cuda THREADS=8 BATCH=16384 EPOCHS=100 MODEL=resnet18 WIDTH=0 TRAIN_SUBSET=0
    TEST_SUBSET=0 CKPT_EVERY=30 EVAL_EVERY=15 SEEDS_DEFAULT="0 1 2"
    OPTIMIZERS="tvlars wa-lars lamb" GRIDS="tvlars=17,34,68 wa-lars=8.5,17,34 lamb=0.085"
    SEED_OPTIMIZERS="tvlars wa-lars"
    STUDY_DIR="${GPU_STUDY_DIR:-benchmarks/results/gpu_study$SUFFIX}"
    BUDGET_S="${GPU_STUDY_BUDGET_S:-550}" HARD_S="${GPU_STUDY_HARD_S:-565}"
    RUN_EST_S="${GPU_STUDY_RUN_EST_S:-180}"
fi
SEEDS="${GPU_STUDY_SEEDS:-$SEEDS_DEFAULT}"
mkdir -p "$STUDY_DIR"
STUDY_DIR="$(cd "$STUDY_DIR" && pwd)"
LOG="${OUT:-$STUDY_DIR}"
mkdir -p "$LOG"
LOG="$(cd "$LOG" && pwd)"

if [ "$MODE" != plan ] && ! have_data "$DATA"; then
    echo "Fashion-MNIST not found in $DATA: run 'benchmarks/gpu_study.sh --stage-data' here and" \
        "name its folder in the device call's carry (carry=[\".data\"])" >&2
    exit 2
fi
DATA="$(realpath -m "$DATA")"

# accuracy_study.py's options that stay the same for every run, then the recipes' own
# (unknown to accuracy_study.py, passed through; the later --checkpoint-every wins).
FIXED=(--out "$STUDY_DIR" --bt-batches --max-extend 0 --device "$DEVICE" --workers 1
    --threads "$THREADS" --epochs "$EPOCHS" --model "$MODEL" --width "$WIDTH"
    --micro-batch "$BATCH" --train-subset "$TRAIN_SUBSET" --test-subset "$TEST_SUBSET"
    --data-dir="$DATA" --stem="$STEM" --mixed-precision="$PRECISION" --channels-last
    --checkpoint-every="$CKPT_EVERY" --eval-every="$EVAL_EVERY")
read -ra SEED_LIST <<< "$SEEDS"
read -ra OPT_LIST <<< "$OPTIMIZERS"
read -ra GRID_LIST <<< "$GRIDS"
read -ra SEED_OPT_LIST <<< "$SEED_OPTIMIZERS"
# The whole study, as accuracy_study.py --status / --report see it.
ALL=(--batches "$BATCH" --seeds "${SEED_LIST[@]}" --optimizers "${OPT_LIST[@]}"
    --lr-grid "${GRID_LIST[@]}" --seed-optimizers "${SEED_OPT_LIST[@]}" "${FIXED[@]}")

export GS_MODE=$MODE GS_STUDY_DIR=$STUDY_DIR GS_LOG=$LOG GS_DATA=$DATA GS_BATCH=$BATCH \
    GS_SEEDS=$SEEDS GS_OPTIMIZERS=$OPTIMIZERS GS_GRIDS=$GRIDS GS_SEED_OPTIMIZERS=$SEED_OPTIMIZERS \
    GS_BUDGET_S=$BUDGET_S GS_RUN_EST_S=$RUN_EST_S
GS_T0="$(date +%s)"
export GS_T0

# The driver: plans the runs from results.jsonl (accuracy_study's own Study: tags, chosen LRs),
# runs each one as one accuracy_study.py invocation restricted to it (in this process: one
# torch import, not one per run), checks the budget before each, copies results to $LOG.
read -r -d '' DRIVER <<'EOF' || true
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

env = os.environ
script = Path("benchmarks/accuracy_study.py").resolve()
spec = importlib.util.spec_from_file_location("accuracy_study", script)
study_mod = importlib.util.module_from_spec(spec)
sys.modules["accuracy_study"] = study_mod  # for its dataclasses
spec.loader.exec_module(study_mod)
mode, fixed = env["GS_MODE"], sys.argv[1:]
out, log = Path(env["GS_STUDY_DIR"]), Path(env["GS_LOG"])
batch, seeds = int(env["GS_BATCH"]), [int(s) for s in env["GS_SEEDS"].split()]
opts, seed_opts = env["GS_OPTIMIZERS"].split(), env["GS_SEED_OPTIMIZERS"].split()
grids = dict(item.split("=", 1) for item in env["GS_GRIDS"].split())
grid = {o: sorted(float(x) for x in grids[o].split(",")) for o in opts}
t0, budget = float(env["GS_T0"]), float(env["GS_BUDGET_S"])
GRID, SEED = "cls grid, largest batches", "cls 2nd seed, largest batches"
study = study_mod.Study(
    out=out,
    batches=(batch,),
    bt_batches=(),
    seeds=tuple(seeds),
    optimizers=tuple(opts),
    lr_grid={o: tuple(v) for o, v in grid.items()},
    seed_optimizers=tuple(seed_opts),
    max_extend=0,
)


def lr_args(opt, lrs):
    return ["--lr-grid", f"{opt}=" + ",".join(f"{x:g}" for x in lrs)]


def plan():
    """(key, label, spec or None, argv) per run, in the order to run them. The grid: each
    optimizer's middle LR, then one step up, one down, two up...; then each seed in turn for
    the seed optimizers (spec None until the grid has chosen the LR)."""
    steps = []
    for k, opt in enumerate(opts):
        mid = len(grid[opt]) // 2
        for i, lr in enumerate(grid[opt]):
            d = i - mid
            run = study_mod.RunSpec("cls", opt, batch, lr, seeds[0], "grid")
            argv = ["--batches", str(batch), "--optimizers", opt, *lr_args(opt, [lr])]
            argv += ["--seeds", str(seeds[0])]
            steps.append(
                ((2 * d - 1 if d > 0 else -2 * d, k), run.tag, run, [*argv, "--phases", GRID])
            )
    for j, seed in enumerate(seeds[1:]):
        for k, opt in enumerate(o for o in opts if o in seed_opts):
            lr = study.chosen_lr("cls", batch, opt)
            run = None if lr is None else study_mod.RunSpec("cls", opt, batch, lr, seed, "seed")
            label = run.tag if run else f"{opt} seed {seed} (at the LR its grid chooses)"
            argv = ["--batches", str(batch), "--optimizers", opt, "--seed-optimizers", opt]
            argv += lr_args(opt, grid[opt])
            argv += ["--seeds", str(seeds[0]), str(seed), "--phases", SEED]
            steps.append(((10_000 + j, k), label, run, argv))
    return sorted(steps, key=lambda s: s[0])


def copy_out(*names):
    if log == out:
        return
    for name in ("results.jsonl", "sessions.jsonl", "report.md", *names):
        if (out / name).is_file():
            shutil.copyfile(out / name, log / Path(name).name)


def full_argv():
    return [
        "--batches",
        str(batch),
        "--seeds",
        *map(str, seeds),
        "--optimizers",
        *opts,
        "--lr-grid",
        *(f"{o}={grids[o]}" for o in opts),
        "--seed-optimizers",
        *seed_opts,
        *fixed,
    ]


def machine():
    import torch

    lines = [
        f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, "
        f"cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, "
        f"{os.cpu_count()} CPUs"
    ]
    missing = []  # what the recipes and the report import, by its distribution's name
    for name in ("torchvision", "accelerate", "matplotlib", "scikit-learn", "tqdm", "numpy"):
        try:
            lines.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(
            f"device {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs"
        )
    with open(log / "machine.log", "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if missing:
        print(
            f"missing Python packages: {', '.join(missing)}: carry them as wheels "
            "(.library/device/README.md)",
            flush=True,
        )
        raise SystemExit(3)
    if mode == "gpu" and not torch.cuda.is_available():
        print("no CUDA device: this study needs the GPU (--cpu-smoke runs on CPU)", flush=True)
        raise SystemExit(3)


def invoke(argv):
    sys.argv = [str(script), *argv]
    try:
        study_mod.main(argv)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            print(f"accuracy_study.py stopped: {exc.code}", flush=True)


steps = plan()
if mode == "plan":
    done = study.results()
    print(
        f"{len(steps)} runs, in this order ({sum(s[2] is not None and s[2].tag in done for s in steps)} finished):"
    )
    for n, (_, label, run, _) in enumerate(steps, 1):
        print(f"  {n:2d}. {label}{' (finished)' if run is not None and run.tag in done else ''}")
    invoke([*full_argv(), "--status"])
    raise SystemExit(0)
machine()
print(f"{len(steps)} runs planned; budget {budget:.0f} s from the script's start", flush=True)
walls, rc, ran = [], 0, 0
while True:
    done = study.results()
    todo = [s for s in plan() if s[2] is None or s[2].tag not in done]
    runnable = [s for s in todo if s[2] is not None]
    if not runnable:
        if todo:
            print("waiting for a grid that did not finish: " + ", ".join(s[1] for s in todo))
        break
    _, label, run, argv = runnable[0]
    elapsed = time.time() - t0
    before = [r["wall_s"] + 10 for r in done.values() if r.get("wall_s")]
    est = max(walls or before or [float(env["GS_RUN_EST_S"])])
    if elapsed + est > budget:
        print(
            f"budget: {elapsed:.0f} of {budget:.0f} s used, a run takes ~{est:.0f} s; not started "
            f"({len(todo)}): " + ", ".join(s[1] for s in todo),
            flush=True,
        )
        break
    print(f"=== run {label} ({elapsed:.0f} s in, ~{est:.0f} s expected)", flush=True)
    start = time.time()
    invoke([*argv, *fixed, "--no-plots"])  # the figures once, at the end
    walls.append(time.time() - start)
    copy_out()
    folder = study.run_dir(run)
    if run.tag not in study.results():
        print(f"FAILED {run.tag}: the end of {folder / 'stdout.log'}:", flush=True)
        lines = (
            (folder / "stdout.log").read_text().splitlines()
            if (folder / "stdout.log").exists()
            else []
        )
        print("\n".join(lines[-40:]), flush=True)
        rc = 1
        break
    ran += 1
    train = [
        json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if '"train"' in x
    ]
    if train:
        t = train[-1]
        print(
            f"{run.tag}: {t.get('samples_per_s', 0):.0f} training images/s over "
            f"{t.get('time', 0):.0f} s; {walls[-1]:.0f} s for the whole run",
            flush=True,
        )
invoke([*full_argv(), "--report"])
copy_out("curves.png", f"plots/cls-b{batch}/lnr.png")
done = study.results()
print(
    f"this call: {ran} runs in {time.time() - t0:.0f} s; the study: "
    f"{sum(s[2] is not None and s[2].tag in done for s in plan())} of {len(steps)} runs finished"
)
raise SystemExit(rc)
EOF

if [ "$MODE" = plan ]; then
    exec "$PYTHON" -c "$DRIVER" "${FIXED[@]}"
fi

# Where the device's copy has no git, sessions.jsonl names the commit --stage-data recorded.
if [ "$MODE" = gpu ] && ! git rev-parse HEAD > /dev/null 2>&1; then
    echo "$(cat "$(dirname "$DATA")/commit" 2> /dev/null || echo unknown) (device copy)" > .study_commit
fi

SAMPLER=
cleanup() { if [ -n "$SAMPLER" ]; then kill "$SAMPLER" 2> /dev/null || true; fi; }
trap cleanup EXIT
{
    date -u
    echo "code: $(git rev-parse HEAD 2> /dev/null || cat .study_commit 2> /dev/null || echo unknown)"
    if [ "$MODE" = gpu ] && command -v nvidia-smi > /dev/null; then nvidia-smi -L; else echo "no GPU ($MODE)"; fi
} 2>&1 | tee -a "$LOG/machine.log"
if [ "$MODE" = gpu ] && command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,memory.used,memory.total,utilization.gpu,power.draw \
        --format=csv -l 5 > "$LOG/gpu.csv" 2>&1 &
    SAMPLER=$!
fi

LOGS=("$STUDY_DIR/study.log")
if [ "$LOG" != "$STUDY_DIR" ]; then LOGS+=("$LOG/study.log"); fi
echo "=== $(date -u '+%F %T') gpu_study.sh ($MODE): study in $STUDY_DIR, logs in $LOG" | tee -a "${LOGS[@]}"
LEFT=$((HARD_S - SECONDS))
rc=0
# timeout signals its whole process group: the driver and the recipe process it waits for.
timeout -k 5 "$((LEFT > 1 ? LEFT : 1))" "$PYTHON" -c "$DRIVER" "${FIXED[@]}" 2>&1 \
    | tee -a "${LOGS[@]}" || rc=$?
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    {
        echo "hard deadline ($HARD_S s): the run in progress was stopped; it resumes from its last"
        echo "checkpoint if rerun on this machine, else it starts again. Report:"
        timeout 20 "$PYTHON" benchmarks/accuracy_study.py "${ALL[@]}" --report || true
    } 2>&1 | tee -a "${LOGS[@]}"
    if [ "$LOG" != "$STUDY_DIR" ]; then
        for f in results.jsonl sessions.jsonl report.md curves.png "plots/cls-b$BATCH/lnr.png"; do
            if [ -f "$STUDY_DIR/$f" ]; then cp "$STUDY_DIR/$f" "$LOG/"; fi
        done
    fi
    rc=0
fi
cleanup
SAMPLER=
if [ -s "$LOG/gpu.csv" ]; then
    awk -F', ' 'NR > 1 && $2 + 0 > peak { peak = $2 + 0; total = $3 }
        END { if (peak) print "peak GPU memory used (nvidia-smi, every 5 s): " peak " of " total }' \
        "$LOG/gpu.csv" | tee -a "${LOGS[@]}"
fi
echo "=== $(date -u '+%F %T') gpu_study.sh done in $SECONDS s (rc $rc); files in $LOG:" \
    "$(cd "$LOG" && echo *)" | tee -a "${LOGS[@]}"
exit "$rc"
