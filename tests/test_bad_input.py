"""Bad input fails before training starts, in one line that names the field.

Each case is what a user could type: a command line of ``launch/train_classification.py`` or
``launch/train_barlow_twins.py`` (run in-process; it must exit with status 2 and print one
``error:`` line, nothing else: no usage dump, no traceback), a DeepSpeed JSON, or a direct call
of the optimizer or the resume check. ``docs/bad_input.md`` lists the cases with their
messages; ``python tests/test_bad_input.py`` prints that table from this file. One test runs a
refusal under ``accelerate launch`` with 2 processes: the line is printed once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

from tvlars_scale import TVLARS
from tvlars_scale.recipes import optim
from tvlars_scale.recipes.checkpoint import Checkpointer, TrainState

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name[:-3], ROOT / "launch" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli(
    argv: list[str], env: dict[str, str] | None = None, script: str = "train_classification.py"
) -> str:
    """Run the classification CLI (or ``script``) in this process; return its one-line error."""
    module = _script(script)
    saved = dict(os.environ)
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):  # in-process: not a launched process
        os.environ.pop(name, None)
    os.environ.update(env or {})
    err = io.StringIO()
    try:
        with (
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(io.StringIO()),  # the run's header line
            pytest.raises(SystemExit) as exit_info,
        ):
            module.main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    text = err.getvalue()
    assert exit_info.value.code == 2, text
    (line,) = text.splitlines()  # "<prog>: error: <message>" only: no usage, no traceback
    return line.split(": error: ", 1)[1]


def _deepspeed_file(tmp: Path, text: str) -> dict[str, str]:
    path = tmp / "ds.json"
    path.write_text(text)
    return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}


def _json_optimizer(section: dict, **top) -> str:
    """The recipe's check of a DeepSpeed JSON optimizer section (what prepare() runs)."""
    config = {"optimizer": section, **top}
    try:
        notes = optim.deepspeed_json_optimizer(config, optim.OptimizerConfig(), 10, 100)
    except ValueError as exc:
        return str(exc)
    return "\n".join(notes)


def _raises(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def _sparse_gradient_step() -> str:
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = TVLARS(embedding.named_parameters(), lr=1.0)
    embedding(torch.tensor([1, 2])).sum().backward()
    before = embedding.weight.detach().clone()
    with pytest.raises(RuntimeError) as info:  # the type torch's Adam raises for them
        opt.step()
    assert torch.equal(embedding.weight, before)  # refused before anything moved
    return str(info.value)


def _resume_check(tmp: Path, run: dict, saved: dict) -> str:
    """The resume check of a 2-process DDP run described by ``run``, on a checkpoint that
    recorded ``saved``."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2)
    checkpointer = Checkpointer(
        accelerator, tmp, torch.nn.Linear(1, 1), None, TrainState(), run=run
    )
    saved = {"step": 40, "engine": "multi_cpu", **saved}
    return _raises(checkpointer._check_compatible, tmp / "step_0000040", saved)


def _resume_other_batch(tmp: Path) -> str:
    return _resume_check(tmp, {"global_batch": 512}, {"global_batch": 1024})


#: What a digits classification run's checkpoint records of its model (``Run.identity``).
DIGITS_CNN = {
    "recipe": "classification",
    "--dataset": "digits",
    "--model": "small-cnn",
    "--width": 32,
}


def _resume_other_model(tmp: Path, **changed) -> str:
    return _resume_check(tmp, {"model": DIGITS_CNN}, {"model": DIGITS_CNN | changed})


def _output_dir_is_a_file(tmp: Path) -> str:
    (tmp / "file").touch()
    return _cli(["--output-dir", str(tmp / "file")])


def _accelerate_without_distribution() -> str:
    """WORLD_SIZE=2 (2 processes launched) but accelerate's distributed type NO: what a plain
    ``Accelerator()`` gets under launch/configs/cpu_2proc.yaml on a machine without GPUs."""
    from accelerate.utils import DistributedType

    class Alone:  # that process's Accelerator
        distributed_type, num_processes = DistributedType.NO, 1

        def __init__(self, **kwargs) -> None:
            pass

    with mock.patch("accelerate.Accelerator", Alone):
        return _cli([], {"WORLD_SIZE": "2"})


def _resume_other_epochs(tmp: Path) -> str:
    """A run of 4 epochs (8 steps) resumed as one of 40: TVLARS' phi spans the run."""
    common = ["--no-progress", "--no-plots", "--output-dir", str(tmp / "run")]
    with contextlib.redirect_stdout(io.StringIO()):
        _script("train_classification.py").main([*common, "--epochs", "4"])
    return _cli([*common, "--epochs", "40", "--final-factor", "0.2", "--resume", "auto"])


TVLARS_JSON = {"type": "TVLARS", "params": {"lr": "auto", "weight_decay": "auto"}}

#: id -> (what the user did, how to reproduce it (tmp dir -> message), expected fragment)
CASES = {
    "negative-lr": ("--lr -1", lambda t: _cli(["--lr", "-1"]), "invalid --lr=-1.0"),
    "nan-lr": ("--lr nan", lambda t: _cli(["--lr", "nan"]), "invalid --lr=nan"),
    "negative-lambda": (
        "--lmbda -0.001",
        lambda t: _cli(["--lmbda", "-0.001"]),
        "invalid --lmbda=-0.001",
    ),
    "nan-lambda": ("--lmbda nan", lambda t: _cli(["--lmbda", "nan"]), "invalid --lmbda=nan"),
    "negative-eta": ("--eta -0.001", lambda t: _cli(["--eta", "-0.001"]), "invalid --eta=-0.001"),
    "nan-eta": ("--eta nan", lambda t: _cli(["--eta", "nan"]), "invalid --eta=nan"),
    "momentum-one": ("--momentum 1", lambda t: _cli(["--momentum", "1"]), "invalid --momentum=1.0"),
    "optimizer-nan-lr": (
        "`TVLARS(params, lr=float('nan'))`",
        lambda t: _raises(TVLARS, [torch.zeros(2, requires_grad=True)], lr=float("nan")),
        "TVLARS: invalid lr=nan",
    ),
    "optimizer-negative-lambda": (
        "`TVLARS(params, lmbda=-1)`",
        lambda t: _raises(TVLARS, [torch.zeros(2, requires_grad=True)], lr=1.0, lmbda=-1.0),
        "TVLARS: invalid lmbda=-1.0",
    ),
    "lambda-and-final-factor": (
        "--lmbda 0.001 --final-factor 0.05",
        lambda t: _cli(["--lmbda", "0.001", "--final-factor", "0.05"]),
        "--lmbda=0.001 (per optimizer step) and --final-factor=0.05 (over the run) both describe",
    ),
    "final-factor-above-delay-value": (
        "--final-factor 0.6 (alpha 1)",
        lambda t: _cli(["--final-factor", "0.6"]),
        "invalid --final-factor=0.6; expected a number in (0, 0.5)",
    ),
    "delay-past-the-run": (
        "--delay-epochs 40 --epochs 40",
        lambda t: _cli(["--delay-epochs", "40", "--epochs", "40"]),
        "--delay-epochs=40 is not shorter than the run (80 steps = 40 epochs)",
    ),
    "optimizer-final-factor-range": (
        "`TVLARS(params, total_steps=100, final_factor=0.5)`",
        lambda t: _raises(
            TVLARS, [torch.zeros(2, requires_grad=True)], total_steps=100, final_factor=0.5
        ),
        "TVLARS: invalid final_factor=0.5; expected a number in (0, 0.5)",
    ),
    "optimizer-lambda-contradicts-run": (
        "`TVLARS(params, lmbda=1e-3, total_steps=100)`",
        lambda t: _raises(
            TVLARS, [torch.zeros(2, requires_grad=True)], lmbda=1e-3, total_steps=100
        ),
        "TVLARS: lmbda=0.001 contradicts total_steps=100, delay_fraction=0.1, final_factor=0.05",
    ),
    "optimizer-total-steps-too-long": (
        "`TVLARS(params, total_steps=2**24 + 1)`",
        lambda t: _raises(TVLARS, [torch.zeros(2, requires_grad=True)], total_steps=2**24 + 1),
        "TVLARS: invalid total_steps=16777217; expected an integer in [1, 2**24]",
    ),
    "optimizer-start-overflows": (
        "`TVLARS(params, alpha=0, total_steps=100, delay_fraction=0.99, final_factor=1e-3)`",
        lambda t: _raises(
            TVLARS,
            [torch.zeros(2, requires_grad=True)],
            alpha=0.0,
            total_steps=100,
            delay_fraction=0.99,
            final_factor=1e-3,
        ),
        "TVLARS: invalid alpha=0.0 with lmbda=6.907755278982137 and delay_steps=99.0: phi(0)",
    ),
    "optimizer-fraction-without-total": (
        "`TVLARS(params, delay_fraction=0.2)`",
        lambda t: _raises(TVLARS, [torch.zeros(2, requires_grad=True)], delay_fraction=0.2),
        "TVLARS: delay_fraction=0.2 describes phi over a run and needs total_steps",
    ),
    "optimizer-sparse-gradient": (
        "`TVLARS(nn.Embedding(10, 4, sparse=True).named_parameters())`, then a step",
        lambda t: _sparse_gradient_step(),
        "TVLARS: layer 'weight' has a torch.sparse_coo gradient",
    ),
    "epochs-zero": ("--epochs 0", lambda t: _cli(["--epochs", "0"]), "invalid --epochs=0.0"),
    "epochs-negative": ("--epochs=-3", lambda t: _cli(["--epochs=-3"]), "invalid --epochs=-3.0"),
    "epochs-nan": (
        "--epochs nan",
        lambda t: _cli(["--epochs", "nan"]),
        "invalid --epochs=nan; expected a finite number in (0, inf)",
    ),
    "epochs-inf": ("--epochs inf", lambda t: _cli(["--epochs", "inf"]), "invalid --epochs=inf"),
    "max-steps-zero": (
        "--max-steps 0",
        lambda t: _cli(["--max-steps", "0"]),
        "invalid --max-steps=0; expected an integer >= 1",
    ),
    "log-every-zero": (
        "--log-every 0",
        lambda t: _cli(["--log-every", "0"]),
        "invalid --log-every=0; expected an integer >= 1",
    ),
    "telemetry-every-zero": (
        "--telemetry-every 0",
        lambda t: _cli(["--telemetry-every", "0"]),
        "invalid --telemetry-every=0; expected an integer >= 1",
    ),
    "eval-every-negative": (
        "--eval-every -1",
        lambda t: _cli(["--eval-every", "-1"]),
        "invalid --eval-every=-1; expected an integer >= 0",
    ),
    "checkpoint-every-negative": (
        "--checkpoint-every -2",
        lambda t: _cli(["--checkpoint-every", "-2"]),
        "invalid --checkpoint-every=-2; expected an integer >= 0",
    ),
    "keep-no-checkpoints": (
        "--keep-checkpoints 0",
        lambda t: _cli(["--keep-checkpoints", "0"]),
        "invalid --keep-checkpoints=0; expected an integer >= 1",
    ),
    "negative-num-workers": (
        "--num-workers -1",
        lambda t: _cli(["--num-workers", "-1"]),
        "invalid --num-workers=-1; expected an integer >= 0",
    ),
    "barlow-twins-nan-linear-epochs": (
        "train_barlow_twins.py --linear-epochs nan",
        lambda t: _cli(["--linear-epochs", "nan"], script="train_barlow_twins.py"),
        "invalid --linear-epochs=nan; expected a finite number in [0, inf)",
    ),
    "barlow-twins-negative-lambda": (
        "train_barlow_twins.py --bt-lambda -1",
        lambda t: _cli(["--bt-lambda", "-1"], script="train_barlow_twins.py"),
        "invalid --bt-lambda=-1.0",
    ),
    "barlow-twins-inf-linear-lr": (
        "train_barlow_twins.py --linear-lr inf",
        lambda t: _cli(["--linear-lr", "inf"], script="train_barlow_twins.py"),
        "invalid --linear-lr=inf",
    ),
    "barlow-twins-nan-linear-weight-decay": (
        "train_barlow_twins.py --linear-weight-decay nan",
        lambda t: _cli(["--linear-weight-decay", "nan"], script="train_barlow_twins.py"),
        "invalid --linear-weight-decay=nan",
    ),
    "barlow-twins-zero-linear-batch": (
        "train_barlow_twins.py --linear-batch-size 0",
        lambda t: _cli(["--linear-batch-size", "0"], script="train_barlow_twins.py"),
        "invalid --linear-batch-size=0; expected an integer >= 1",
    ),
    "lars-option-with-lamb": (
        "--optimizer lamb --momentum 0.95",
        lambda t: _cli(["--optimizer", "lamb", "--momentum", "0.95"]),
        "--momentum=0.95 is used by --optimizer tvlars/wa-lars/nowa-lars only; "
        "--optimizer=lamb ignores it",
    ),
    "tvlars-option-with-lars": (
        "--optimizer wa-lars --final-factor 0.2",
        lambda t: _cli(["--optimizer", "wa-lars", "--final-factor", "0.2"]),
        "--final-factor=0.2 is used by --optimizer tvlars only; --optimizer=wa-lars ignores it",
    ),
    "tvlars-option-at-its-default-with-lamb": (
        "--optimizer lamb --alpha 1",
        lambda t: _cli(["--optimizer", "lamb", "--alpha", "1"]),
        "--alpha=1 is used by --optimizer tvlars only; --optimizer=lamb ignores it",
    ),
    "warmup-without-warmup-schedule": (
        "--optimizer tvlars --warmup-epochs 5",
        lambda t: _cli(["--warmup-epochs", "5"]),
        "--warmup-epochs=5 is used by the warmup-cosine LR schedule only",
    ),
    "poly-power-without-poly-schedule": (
        "--optimizer wa-lars --poly-power 3",
        lambda t: _cli(["--optimizer", "wa-lars", "--poly-power", "3"]),
        "--poly-power=3 is used by the poly LR schedule only",
    ),
    "val-fraction-one": (
        "--val-fraction 1",
        lambda t: _cli(["--val-fraction", "1"]),
        "invalid --val-fraction=1.0; expected a finite number in [0, 1)",
    ),
    "batch-not-divisible-by-world": (
        "--global-batch-size 511 on 2 processes",
        lambda t: _cli(["--global-batch-size", "511"], {"WORLD_SIZE": "2"}),
        "--global-batch-size=511 is not divisible by the world size 2",
    ),
    "batch-not-divisible-by-micro": (
        "--global-batch-size 512 --per-device-batch-size 3",
        lambda t: _cli(["--global-batch-size", "512", "--per-device-batch-size", "3"]),
        "not a multiple of --per-device-batch-size=3",
    ),
    "unknown-optimizer": (
        "--optimizer adam",
        lambda t: _cli(["--optimizer", "adam"]),
        "argument --optimizer: invalid choice: 'adam'",
    ),
    "unknown-dataset": (
        "--dataset imagenet",
        lambda t: _cli(["--dataset", "imagenet"]),
        "argument --dataset: invalid choice: 'imagenet'",
    ),
    "missing-data-dir": (
        "--dataset fashion-mnist --data-dir /nonexistent",
        lambda t: _cli(["--dataset", "fashion-mnist", "--data-dir", str(t / "nonexistent")]),
        "nonexistent",
    ),
    "deepspeed-json-syntax": (
        "DeepSpeed JSON with a trailing comma",
        lambda t: _cli([], _deepspeed_file(t, '{"zero_optimization": {"stage": 2},}')),
        "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 36",
    ),
    "deepspeed-json-missing": (
        "DeepSpeed JSON path that does not exist",
        lambda t: _cli(
            [],
            {
                "ACCELERATE_USE_DEEPSPEED": "true",
                "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(t / "missing.json"),
            },
        ),
        "cannot read it (No such file or directory)",
    ),
    "deepspeed-json-wrong-type": (
        'JSON `"momentum": "0.9"` (a string)',
        lambda t: _json_optimizer(
            {"type": "TVLARS", "params": {"lr": "auto", "momentum": "0.9"}}, gradient_clipping=0
        ),
        "TVLARS: invalid momentum='0.9'",
    ),
    "deepspeed-json-unknown-key": (
        'JSON `"lamda": 0.01`',
        lambda t: _json_optimizer(
            {"type": "TVLARS", "params": {"lamda": 0.01}}, gradient_clipping=0
        ),
        "unknown key optimizer.params.lamda (did you mean 'lmbda'?)",
    ),
    "deepspeed-json-total-steps": (
        'JSON `"total_steps": 1.5e3` (not an integer)',
        lambda t: _json_optimizer(
            {"type": "TVLARS", "params": {"total_steps": 1.5e3}}, gradient_clipping=0
        ),
        "TVLARS: invalid total_steps=1500.0; expected an integer in [1, 2**24]",
    ),
    "deepspeed-json-unknown-optimizer": (
        'JSON `"type": "Adam"`',
        lambda t: _json_optimizer({"type": "Adam"}),
        "optimizer type='Adam': this recipe runs TVLARS, LARS or LayerwiseLAMB",
    ),
    "deepspeed-json-clipping-type": (
        'JSON `"gradient_clipping": "1.0"` (a string)',
        lambda t: _json_optimizer(TVLARS_JSON, gradient_clipping="1.0"),
        "invalid gradient_clipping='1.0'",
    ),
    "gradient-clipping-with-tvlars (allowed, warns)": (
        'JSON `"gradient_clipping": 1.0` with TVLARS',
        lambda t: _json_optimizer(TVLARS_JSON, gradient_clipping=1.0),
        "warning: DeepSpeed config sets gradient_clipping=1.0",
    ),
    "hsdp-mesh": (
        "--fsdp2 --fsdp2-replicate 3 on 2 processes",
        lambda t: _cli(["--fsdp2", "--fsdp2-replicate", "3"], {"WORLD_SIZE": "2"}),
        "invalid --fsdp2-replicate=3; expected a divisor of the world size 2",
    ),
    "channels-last-with-fsdp2": (
        "--channels-last --fsdp2",
        lambda t: _cli(["--channels-last", "--fsdp2"]),
        "--channels-last is supported in one process and under DDP, not with --fsdp2",
    ),
    "resume-nothing-there": (
        "--resume /nonexistent",
        lambda t: _cli(["--resume", str(t / "nonexistent"), "--output-dir", str(t / "run")]),
        "no complete checkpoint there",
    ),
    "resume-other-epochs": (
        "--resume of an --epochs 4 checkpoint with --epochs 40 --final-factor 0.2",
        _resume_other_epochs,
        "the checkpoint was taken with --epochs=4, this run has --epochs=40",
    ),
    "resume-other-global-batch": (
        "--resume of a --global-batch-size 1024 checkpoint with 512",
        _resume_other_batch,
        "the checkpoint was taken with --global-batch-size=1024, this run has "
        "--global-batch-size=512",
    ),
    "resume-other-model": (
        "--resume of a --model small-cnn-s2 checkpoint with --model small-cnn",
        lambda t: _resume_other_model(t, **{"--model": "small-cnn-s2"}),
        "the checkpoint was taken with --model=small-cnn-s2, this run has --model=small-cnn; "
        "its weights are of that network and data",
    ),
    "resume-other-dataset": (
        "--resume of a --dataset mnist5k checkpoint with --dataset digits",
        lambda t: _resume_other_model(t, **{"--dataset": "mnist5k"}),
        "the checkpoint was taken with --dataset=mnist5k, this run has --dataset=digits",
    ),
    "resume-other-recipe": (
        "--resume of a train_barlow_twins.py checkpoint by train_classification.py",
        lambda t: _resume_other_model(t, recipe="barlow-twins"),
        "the checkpoint was written by the barlow-twins recipe, this is the classification recipe",
    ),
    "image-size-zero": (
        "--image-size 0",
        lambda t: _cli(["--image-size", "0"]),
        "invalid --image-size=0; expected an integer >= 1",
    ),
    "train-subset-zero": (
        "--train-subset 0",
        lambda t: _cli(["--train-subset", "0"]),
        "invalid --train-subset=0; expected an integer >= 1",
    ),
    "output-dir-is-a-file": (
        "--output-dir of an existing file",
        _output_dir_is_a_file,
        "(a file); expected a directory, or a path where one can be created",
    ),
    "world-size-without-distribution": (
        "2 processes launched, accelerate's distributed type NO",
        lambda t: _accelerate_without_distribution(),
        "WORLD_SIZE=2 (processes started by the launcher) but accelerate's distributed type is "
        "NO with 1 process(es): each process would train alone",
    ),
    "lamb-at-a-lars-lr (allowed, warns)": (
        "--optimizer lamb --lr 2",
        lambda t: "\n".join(optim.lr_warnings(optim.OptimizerConfig(name="lamb", lr=2.0), 512)),
        "warning: --optimizer=lamb with --lr=2: LAMB's LR is the relative change of each layer "
        "per step",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_message(case, tmp_path):
    _, reproduce, expected = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        message = reproduce(tmp_path)
    assert expected in message, message


def test_one_line_under_a_launcher(tmp_path):
    """A refusal met by both processes of an ``accelerate launch`` (after the process group
    exists: a --resume with no checkpoint) is printed once, by the first process, and the run
    fails (status 2 from the processes; the launcher then exits 1 after its own report, whose
    root cause shows the same line)."""
    script = ROOT / "launch" / "train_classification.py"
    config = ROOT / "launch" / "configs" / "cpu_2proc.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += [str(script), "--no-progress", "--output-dir", str(tmp_path / "run")]
    cmd += ["--resume", str(tmp_path / "nothing")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    prefix = "train_classification.py: error: --resume="
    assert len([x for x in output.splitlines() if x.startswith(prefix)]) == 1, output[-4000:]
    assert f"traceback : {prefix}" in output  # torch elastic's block names it, not a link
    assert "tvlars_scale" not in output and "Fatal Python error" not in output


def test_the_doc_table_has_every_case():
    """docs/bad_input.md is generated from CASES (``python tests/test_bad_input.py``): a case
    added or renamed here without regenerating it fails."""
    text = (ROOT / "docs" / "bad_input.md").read_text()
    rows = [line.split("`", 2)[1] for line in text.splitlines() if line.startswith("| `")]
    assert rows == list(CASES)


def _table() -> str:
    import tempfile

    rows = ["| case (test id) | input | message |", "|---|---|---|"]
    for case, (what, reproduce, _) in CASES.items():
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            message = reproduce(Path(tmp)).replace(tmp, "TMP").replace("|", "\\|")
        rows.append(f"| `{case}` | {what} | {message} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(_table())
    sys.exit(0)
