"""Compatibility matrix: one fresh venv per row of engine versions, the test subsets in each,
and the table of docs/compatibility.md.

    python benchmarks/compat_matrix.py --venvs /work/venvs --keep-torch     # every row
    python benchmarks/compat_matrix.py --venvs /tmp/v --rows oldest --steps core multirank
    python benchmarks/compat_matrix.py --venvs /tmp/v --rows newest --write-lock

A row installs the project with ``pip install -c <its lock> -e ".[test]"``: the lock
(``constraints/ci.txt`` for ``newest``, which CI uses too; ``constraints/oldest.txt``) holds the
exact versions resolved once from the row's pins by ``--write-lock`` (``pip install -e ".[dev]"
<pins>`` + ``pip freeze``). ``newest`` pins nothing: it is what pip picks today under the
machine's cap; ``oldest`` pins the lower bounds of pyproject.toml and a DeepSpeed/accelerate of
that time. (Releases below the lower bounds cannot install the project; docs/compatibility.md
says how they were tried and why they are not supported.)

Steps (each a pytest run whose counts go into the table): ``core`` (single-process tests,
torch's optimizer contract, timm), ``multirank`` (gloo CPU worlds: DDP, FSDP2, HSDP, FSDP1 flat
and orig-params, ZeRO-1/2/3, BF16, resharding, TP, FSDP2+TP, pipeline stages, the DeepSpeed
pipeline), ``launch`` (the recipes under accelerate/torchrun/DeepSpeed, two nodes on
localhost, elastic restarts, HF Trainer, Lightning). ``keep-torch`` runs once (``--keep-torch``): a venv holding only
a supported torch + torchvision (the oldest row's) gets ``pip install -e .``, then
``pip install -e ".[recipes,deepspeed]"`` without any lock, and torch must be unchanged.

Results accumulate in benchmarks/results/compat_matrix.json (rows run at different times keep
their own date); the table between the markers of docs/compatibility.md is rewritten from it.
Each row needs 1-6 GB of disk (``--clean`` deletes a row's venv after it) and ~10 min on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "compat_matrix.json"
DOC = ROOT / "docs" / "compatibility.md"
BEGIN, END = "<!-- compat-matrix:begin -->", "<!-- compat-matrix:end -->"
PACKAGES = ("torch", "torchvision", "deepspeed", "accelerate", "transformers")


@dataclass(frozen=True)
class Row:
    python: str  # a version (found on PATH or under pyenv) or an interpreter path
    lock: str  # the constraints file, relative to the repository
    pins: tuple[str, ...] = ()  # what --write-lock resolves the lock from


ROWS = {
    "newest": Row("3.11", "constraints/ci.txt"),
    "oldest": Row(
        "3.10",
        "constraints/oldest.txt",
        pins=(
            "torch==2.9.1",
            "torchvision==0.24.1",
            "deepspeed==0.16.9",
            "accelerate==1.11.0",
            "transformers==4.57.1",
        ),
    ),
}
STEPS = {
    "core": (
        "tests/test_optimizers.py",
        "tests/test_core_sub_groups.py",
        "tests/test_validation_and_registry.py",
        "tests/test_fused.py",
        "tests/test_torch_contract.py",
        "tests/test_tvlars_schedule.py",
        "tests/test_layouts.py",
        "tests/test_timm.py",
        "tests/test_compat.py",
        "tests/test_bad_input.py",
        "tests/test_checkpoint.py",
        "tests/test_recipes.py",
        "tests/test_deepspeed_config.py",
        "tests/test_launch_configs.py",
    ),
    "multirank": (
        "tests/test_multirank_smoke.py",
        "tests/test_fsdp.py",
        "tests/test_deepspeed.py",
        "tests/test_deepspeed_stage0.py",
        "tests/test_reshard.py",
        "tests/test_parallelism.py",
        "tests/test_deepspeed_pipeline.py",
    ),
    "launch": (
        "tests/test_recipes_launch.py",
        "tests/test_elastic.py",
        "tests/test_faults.py",
        "tests/test_hf_trainer.py",
        "tests/test_lightning.py",
    ),
}
KEEP_TORCH_FROM = "oldest"  # the row whose torch + torchvision the keep-torch check starts with


@dataclass
class Venv:
    path: Path

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        proc = subprocess.run(
            [self.python, *args], cwd=ROOT, env=env, capture_output=True, text=True
        )
        if check and proc.returncode:
            raise RuntimeError(f"{self.path}: {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
        return proc

    def pip(self, *args: str) -> None:
        self.run("-m", "pip", "install", "-q", *args)

    def versions(self) -> dict[str, str]:
        code = (
            "import importlib.metadata as m, json, platform\n"
            f"out = {{'python': platform.python_version()}}\n"
            f"for p in {PACKAGES!r}:\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = None\n"
            "print(json.dumps(out))"
        )
        return json.loads(self.run("-c", code).stdout)


def find_python(spec: str) -> str:
    if os.sep in spec:
        return spec
    candidates = [shutil.which(f"python{spec}")]
    candidates += sorted(
        glob.glob(os.path.expanduser(f"~/.pyenv/versions/{spec}*/bin/python{spec}"))
    )
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    raise SystemExit(f"no working python{spec} (give --python {spec}=/path/to/python)")


def make_venv(root: Path, name: str, python: str, reuse: bool) -> Venv:
    path = root / name
    if path.exists() and not reuse:
        shutil.rmtree(path)
    if not path.exists():
        subprocess.run([python, "-m", "venv", str(path)], check=True)
    return Venv(path)


# --------------------------------------------------------------------------------- a row
def write_lock(name: str, row: Row, venv: Venv) -> None:
    venv.pip("-e", ".[dev]", *row.pins)
    frozen = venv.run("-m", "pip", "freeze", "--exclude-editable").stdout
    versions = venv.versions()
    header = (
        f"# Exact versions of the compatibility matrix row {name!r} (Python {versions['python']},"
        f" {datetime.date.today()}),\n# resolved from {' '.join(row.pins) or 'no pins'} by\n"
        f"#   python benchmarks/compat_matrix.py --rows {name} --write-lock\n"
        '# Use: pip install -c <this file> -e ".[test]"\n'
    )
    (ROOT / row.lock).write_text(header + frozen)
    print(f"wrote {row.lock}")


def run_step(venv: Venv, step: str, report_dir: Path) -> dict:
    report = report_dir / f"{step}.xml"
    started = time.perf_counter()
    proc = venv.run(
        "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *STEPS[step],
        check=False,
    )  # fmt: skip
    result = {"seconds": round(time.perf_counter() - started), "exit_code": proc.returncode}
    if not report.is_file():  # pytest did not get as far as running tests
        return result | {"error": (proc.stdout + proc.stderr)[-2000:]}
    counts, failed, skipped = Counter(), [], Counter()
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome = next(
            (child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed"
        )
        counts[outcome] += 1
        if outcome in ("failure", "error"):
            failed.append(name)
        elif outcome == "skipped":
            skipped[next(c for c in case if c.tag == "skipped").get("message", "")] += 1
    return result | {"counts": dict(counts), "failed": failed, "skipped": dict(skipped)}


def run_row(name: str, row: Row, args) -> dict:
    python = args.python.get(row.python) or find_python(row.python)
    venv = make_venv(args.venvs, f"compat-{name}", python, args.reuse)
    if args.write_lock:
        write_lock(name, row, venv)
    venv.pip("-c", row.lock, "-e", ".[test]")
    record = {
        "date": str(datetime.date.today()),
        "commit": _commit(),
        "versions": venv.versions(),
        "steps": {},
    }
    report_dir = args.venvs / f"compat-{name}-reports"
    report_dir.mkdir(exist_ok=True)
    for step in args.steps:
        print(f"[{name}] {step} ...", flush=True)
        record["steps"][step] = run_step(venv, step, report_dir)
        print(f"[{name}] {step}: {summary(record['steps'][step])}", flush=True)
    if args.clean:
        shutil.rmtree(venv.path)
    return record


def _commit() -> str:
    """The commit the tests ran at, ``+`` when the working tree had changes."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD"], capture_output=True).returncode
    return head.stdout.strip() + ("+" if dirty else "")


# --------------------------------------------------------------------------------- keep torch
def keep_torch(args) -> dict:
    """A supported torch is installed; installing the project (core, then with extras, no lock)
    must leave it alone."""
    row = ROWS[KEEP_TORCH_FROM]
    python = args.python.get(row.python) or find_python(row.python)
    venv = make_venv(args.venvs, "compat-keep-torch", python, reuse=False)
    venv.pip("-c", row.lock, "torch", "torchvision")
    before = venv.versions()
    checks = {}
    venv.pip("-e", ".")
    checks["core"] = venv.versions()
    step = (
        "import torch, tvlars_scale\n"
        "m = torch.nn.Linear(3, 2); o = tvlars_scale.TVLARS(m.parameters(), lr=0.1)\n"
        "m(torch.ones(2, 3)).sum().backward(); o.step()\n"
    )
    recipes = "try:\n    import tvlars_scale.recipes\nexcept ImportError as e:\n    print(e)\n"
    core_smoke = venv.run("-c", step + recipes).stdout.strip()
    venv.pip("-e", ".[recipes,deepspeed]")  # no lock: what pip picks for a user
    checks["extras"] = venv.versions()
    consistent = venv.run("-m", "pip", "check", check=False)
    venv.run("-c", step + "import deepspeed, tvlars_scale.recipes.runner\n")
    kept = all(checks[k]["torch"] == before["torch"] for k in checks)
    kept = kept and all(checks[k]["torchvision"] == before["torchvision"] for k in checks)
    shutil.rmtree(venv.path)
    return {
        "date": str(datetime.date.today()),
        "before": before,
        "after_core": checks["core"],
        "after_extras": checks["extras"],
        "core_only_recipes_import": core_smoke,
        "pip_check": consistent.stdout.strip() or consistent.stderr.strip(),
        "kept": kept and consistent.returncode == 0,
    }


# --------------------------------------------------------------------------------- report
def summary(step: dict) -> str:
    if "counts" not in step:
        return f"did not run (exit {step['exit_code']})"
    counts = step["counts"]
    parts = [f"{counts.get('passed', 0)} passed"]
    bad = counts.get("failure", 0) + counts.get("error", 0)
    if bad:
        parts.append(f"**{bad} failed**")
    if counts.get("skipped"):
        parts.append(f"{counts['skipped']} skipped")
    return ", ".join(parts) + f" ({step['seconds']} s)"


def table(results: dict) -> str:
    rows = results.get("rows", {})
    lines = [
        "| row | Python | torch | torchvision | DeepSpeed | accelerate | transformers | "
        + " | ".join(STEPS)
        + " | date |",
        "|---" * (7 + len(STEPS) + 1) + "|",
    ]
    notes = []
    for name in sorted(rows, key=lambda n: list(ROWS).index(n) if n in ROWS else 99):
        record = rows[name]
        v = record["versions"]
        cells = [name, v["python"], *(v[p] or "-" for p in PACKAGES)]
        cells += [summary(record["steps"][s]) if s in record["steps"] else "not run" for s in STEPS]
        when = record["date"] + (f" ({record['commit']})" if record.get("commit") else "")
        lines.append("| " + " | ".join([*cells, when]) + " |")
        for step, result in record["steps"].items():
            for test in result.get("failed", []):
                notes.append(f"- {name}, {step}: failed `{test}`")
            for reason, count in result.get("skipped", {}).items():
                notes.append(f"- {name}, {step}: {count} skipped: {reason}")
    out = "\n".join(lines) + "\n"
    keep = results.get("keep_torch")
    if keep:
        b, c, e = keep["before"], keep["after_core"], keep["after_extras"]
        verdict = "torch kept" if keep["kept"] else "**torch changed or pip check failed**"
        out += (
            f"\n**Existing torch is kept** ({keep['date']}, Python {b['python']}): a venv with "
            f"torch {b['torch']} + torchvision {b['torchvision']}; `pip install -e .` -> torch "
            f'{c["torch"]}; `pip install -e ".[recipes,deepspeed]"` (no lock) -> torch '
            f"{e['torch']}, torchvision {e['torchvision']}, DeepSpeed {e['deepspeed']}, "
            f"accelerate {e['accelerate']}; `pip check`: {keep['pip_check'].rstrip('.')}. {verdict}. "
            f'Core only, `import tvlars_scale.recipes` says: "{keep["core_only_recipes_import"]}"\n'
        )
    if notes:
        out += "\nFailures and skips:\n\n" + "\n".join(notes) + "\n"
    return out


def update_doc(results: dict) -> None:
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + table(results) + text[end:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--venvs", type=Path, default=Path("/work/venvs"), help="where the venvs go")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--steps", nargs="*", choices=STEPS, default=list(STEPS))
    p.add_argument("--keep-torch", action="store_true", help="also run the keep-torch check")
    p.add_argument("--write-lock", action="store_true", help="re-resolve the rows' lock files")
    p.add_argument("--reuse", action="store_true", help="reuse existing venvs")
    p.add_argument("--clean", action="store_true", help="delete each row's venv after it")
    p.add_argument(
        "--python", nargs="*", default=[], metavar="VERSION=PATH", help="interpreters to use"
    )
    args = p.parse_args(argv)
    args.python = dict(item.split("=", 1) for item in args.python)
    args.venvs = args.venvs.resolve()
    args.venvs.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in args.rows:
        results.setdefault("rows", {})[name] = run_row(name, ROWS[name], args)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        update_doc(results)
    if args.keep_torch:
        results["keep_torch"] = keep_torch(args)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        update_doc(results)
    print(table(results))


if __name__ == "__main__":
    sys.exit(main())
