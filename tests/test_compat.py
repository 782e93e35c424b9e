"""The environment the package needs: the core runs on torch alone, optional parts name their
extra, and an engine internal that a release removed is refused with the supported range.

- ``import tvlars_scale`` and a step of every optimizer in a process where no import finder
  finds any optional package (as if not installed); the recipes and ``tvlars-plot`` then fail
  with the ``pip install`` of their extra, and the recipes train without DeepSpeed.
- Fakes of an FSDP1 FlatParameter and of a DeepSpeed ZeRO wrapper that lack one attribute the
  layouts read: the first ``step()`` raises ``UnmappableLayoutError`` naming the installed
  version and the supported range, not ``AttributeError``.
- The ranges in ``tvlars_scale.compat.SUPPORTED`` are pyproject.toml's lower bounds.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import tvlars_scale
from tvlars_scale import TVLARS, UnmappableLayoutError
from tvlars_scale.compat import EXTRAS, SUPPORTED, import_internal, internal

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = sorted({m for modules in EXTRAS.values() for m in modules} | {"deepspeed", "PIL"})


_HIDE = """
import sys

class _Hidden:  # wraps each import finder: the hidden packages cannot be found, as if not installed
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [_Hidden(finder) for finder in sys.meta_path]
"""


def _run_without(hidden: list[str], body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a Python where the packages ``hidden`` are not installed."""
    code = f"HIDDEN = {set(hidden)!r}\n{_HIDE}\n{textwrap.dedent(body)}"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def _run_without_optional_packages(body: str) -> subprocess.CompletedProcess:
    return _run_without(OPTIONAL, body)


def test_core_needs_torch_only():
    proc = _run_without_optional_packages(
        """
        import torch
        import tvlars_scale, tvlars_scale.deepspeed, tvlars_scale.fsdp, tvlars_scale.schedules

        for name in ("TVLARS", "LARS", "LAMB"):
            model = torch.nn.Linear(3, 2)
            opt = tvlars_scale.create_optimizer(name, model.named_parameters(), lr=0.1)
            model(torch.ones(4, 3)).sum().backward()
            opt.step()
        config = {"gradient_clipping": 0.0, "optimizer": {"type": "TVLARS", "params": {"lr": 1.0}}}
        tvlars_scale.deepspeed.check_config(config)
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "ok"


@pytest.mark.parametrize(
    ("statement", "missing"),
    [
        ("import tvlars_scale.recipes", "accelerate, matplotlib, numpy, scikit-learn"),
        ("from tvlars_scale.plotting import main; main(['run', '--out', 'x'])", "matplotlib"),
    ],
)
def test_optional_parts_name_their_extra(statement, missing):
    proc = _run_without_optional_packages(statement)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and missing in last, last
    assert "run pip install -e '.[recipes]' in a clone of tvlars_scale" in last


# --------------------------------------------------------------------------- engine internals
def _assert_names_version_and_range(exc: pytest.ExceptionInfo, package: str, missing: str):
    message = str(exc.value)
    module = sys.modules[package]
    assert f"{package} {module.__version__} has no {missing}" in message
    assert f"Supported: {package} >= {SUPPORTED[package][0]}" in message
    assert "docs/compatibility.md" in message


def _fake_flat_parameter() -> nn.Parameter:
    """What the FSDP1 layout reads of a FlatParameter (unsharded, one layer), except the
    per-layer shard offsets, which a future torch might rename."""
    flat = nn.Parameter(torch.ones(6))
    flat._is_flat_param = True
    flat._sharded_size = torch.Size([6])
    flat._fqns, flat._shapes = ("weight",), (torch.Size([2, 3]),)
    return flat


def test_missing_fsdp1_internal_names_the_torch_version():
    flat = _fake_flat_parameter()
    flat.grad = torch.ones(6)
    with pytest.raises(UnmappableLayoutError) as exc:
        TVLARS([flat], lr=0.1).step()
    _assert_names_version_and_range(exc, "torch", "Parameter._shard_param_infos")


def test_missing_deepspeed_internal_names_the_deepspeed_version():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    master = torch.ones(6, requires_grad=True)  # one rank's flat fp32 partition
    master.grad = torch.ones(6)
    optimizer = TVLARS([master], lr=0.1)
    wrapper = DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer)  # no __init__: no attributes
    param = nn.Parameter(torch.ones(2, 3))
    wrapper.__dict__.update(
        optimizer=optimizer,
        single_partition_of_fp32_groups=[master],
        round_robin_bit16_groups=[[param]],
        bit16_groups=[[param]],
        real_dp_process_group=[None],
    )  # no `partition_size`
    engine = type("Engine", (), {"basic_optimizer": optimizer, "optimizer": wrapper})()
    tvlars_scale.deepspeed.bind(engine)
    with pytest.raises(UnmappableLayoutError) as exc:
        optimizer.step()
    _assert_names_version_and_range(exc, "deepspeed", "DeepSpeedZeroOptimizer.partition_size")


def test_internal_reads_present_attributes_and_refuses_missing_ones():
    flat = _fake_flat_parameter()
    assert internal(flat, "_fqns", "torch") == ("weight",)
    with pytest.raises(UnmappableLayoutError, match=r"has no Parameter\._nope"):
        internal(flat, "_nope", "torch")


@pytest.fixture
def broken_module(tmp_path, monkeypatch):
    (tmp_path / "tests_broken_module.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_import_internal(broken_module):
    assert (
        import_internal("torch.distributed", "all_reduce", "torch") is torch.distributed.all_reduce
    )
    for module, name, missing in [
        ("torch.distributed", "no_such_function", "torch.distributed.no_such_function"),
        ("torch.distributed.no_such_module", "x", "torch.distributed.no_such_module.x"),
    ]:
        with pytest.raises(UnmappableLayoutError, match=re.escape(f"has no {missing}")):
            import_internal(module, name, "torch")
    # A module that exists but fails to import for another reason is not a version problem.
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency"):
        import_internal("tests_broken_module", "x", "torch")


def test_supported_lower_bounds_are_pyproject_lower_bounds():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11's; checked there")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    for package, (oldest, _) in SUPPORTED.items():
        assert f"{package}>={oldest}" in requirements, package
    # Libraries declare ranges; exact versions live in the CI lock only.
    pinned = [r for r in requirements if "==" in r]
    assert pinned == []


def test_readme_commands_use_the_lock_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(python3 -m venv \.venv && .*)\n```", readme)
    assert len(commands) == 2, commands  # run the main job, run the tests
    assert all('-c constraints/ci.txt -e ".[' in command for command in commands)
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
    lock = (ROOT / "constraints" / "ci.txt").read_text()
    for package in ("torch", *SUPPORTED, "torchvision", "accelerate"):
        assert re.search(rf"^{package}==\S+$", lock, re.MULTILINE), package


def test_recipes_run_without_deepspeed(tmp_path):
    """A plain DDP/FSDP user installs the `recipes` extra only."""
    proc = _run_without(
        ["deepspeed"],
        f"""
        import runpy
        sys.argv = ["train_classification.py", "--global-batch-size", "64", "--max-steps", "2",
                    "--train-subset", "128", "--test-subset", "32", "--no-progress", "--no-plots",
                    "--output-dir", {str(tmp_path)!r}]
        runpy.run_path("launch/train_classification.py", run_name="__main__")
        """,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy:" in proc.stdout


def test_require_version_refuses_older_releases(monkeypatch):
    """A feature verified only from some release is refused below it, naming both versions."""
    from types import SimpleNamespace

    from tvlars_scale.compat import require_version

    monkeypatch.setitem(sys.modules, "enginepkg", SimpleNamespace(__version__="0.16.9"))
    with pytest.raises(UnmappableLayoutError) as refused:
        require_version("enginepkg", "0.19", "ZeRO-3", "It differed there", "ZeRO-1/2")
    message = str(refused.value)
    assert "ZeRO-3 needs enginepkg >= 0.19; enginepkg 0.16.9 is installed" in message
    assert "It differed there" in message and "or use ZeRO-1/2" in message
    monkeypatch.setitem(sys.modules, "enginepkg", SimpleNamespace(__version__="0.19.8"))
    require_version("enginepkg", "0.19", "ZeRO-3", "It differed there", "ZeRO-1/2")
