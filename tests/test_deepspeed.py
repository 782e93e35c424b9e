"""DeepSpeed: optimizers built from the JSON type under stage 0, ZeRO-1/2/3 and BF16_Optimizer
train exactly like a single-process run of the same optimizer on the same global batch.

Every multi-rank check shares ONE spawned 2-rank gloo world (the module fixture ``world``): it
builds the 21 engines of ``CASES`` one after the other (17-40 s in all on 2 shared cores) and
returns what each rank saw; the tests then assert on their case. The accelerate test launches its
own 2 processes (12-17 s).

Tolerances:
- fp32: max|w - w_ref| <= 1e-5 * max|w_ref| per tensor. The sharded run sums squares in a
  different order (two partial sums, then an all-reduce) and DeepSpeed averages per-rank
  gradients instead of taking the full-batch mean: fp32 rounding of ~1e-7 relative per step,
  a little amplified over 3 momentum steps (measured <= 2e-7). The per-step update is 1-10% of
  ||w|| here, so any error in a layer's trust ratio shows up far above 1e-5 (the naive
  per-partition norms are off by more than 1e-3: ``test_per_partition_norms_fail_tolerance``).
- bf16: ||w - w_ref|| <= 0.1 * ||w_ref - w_0|| per tensor, against the fp32 reference. DeepSpeed
  runs forward/backward with bf16 weights (unit roundoff 2^-8 = 0.4%) and reduces bf16
  gradients, so the gradient directions differ by about 1% per step; over 3 steps this is
  measured at <= 3.1% of the update. A wrong step count (phi changes by 25-30% per step with
  lmbda=0.5) or per-partition norms move the result by well over 10%.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
from deepspeed_common import (
    DS_CONFIGS,
    MICRO,
    ROOT,
    WORLD,
    batches,
    loss_fn,
    make_model,
    max_relative_error,
    param_groups,
    reference,
    update_relative_error,
)
from multirank import free_port, run_ranks
from torch.torch_version import TorchVersion

import tvlars_scale.deepspeed as tds
from tvlars_scale import UnmappableLayoutError

FP32_TOL = 1e-5
BF16_TOL = 0.1

# Large steps and a fast-decaying phi: trust-ratio and step-count errors become visible.
TVLARS = {"lr": 0.5, "weight_decay": 0.01, "eta": 0.1, "lmbda": 0.5}
LARS = {"lr": 0.5, "weight_decay": 0.01, "eta": 0.1}
LAMB = {"lr": 0.05, "weight_decay": 0.01, "betas": [0.9, 0.99]}


def ds_config(
    stage: int, *, bf16: bool = False, optimizer=("TVLARS", TVLARS), clipping=0.0, **zero
):
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clipping,
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": optimizer[0], "params": dict(optimizer[1])},
        "zero_optimization": {"stage": stage, **zero},
        "steps_per_print": 10**6,
    }
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def file_config(name: str) -> dict:
    config = tds.load_config(
        os.path.join(DS_CONFIGS, name),
        lr=TVLARS["lr"],
        weight_decay=TVLARS["weight_decay"],
        train_micro_batch_size_per_gpu=MICRO,
        gradient_accumulation_steps=1,
    )
    config["optimizer"]["params"].update(eta=TVLARS["eta"], lmbda=TVLARS["lmbda"])
    return config


@dataclass(frozen=True)
class Case:
    name: str
    config: dict = field(hash=False)
    run: str = "train"  # or "naive" (per-partition norms), "checkpoint", "bind", "init_error"
    two_groups: bool = False
    steps: int = 3
    kind: str = ""  # expected layout kind(s) of the basic optimizer's plans
    wrapper: str = ""  # expected type(engine.optimizer).__name__
    older: tuple[str, str] = ("", "")  # (wrapper, kind) that older DeepSpeed releases build

    @property
    def bf16(self) -> bool:
        return self.config.get("bf16", {}).get("enabled", False)


CONFIG_FILES = sorted(f for f in os.listdir(DS_CONFIGS) if f.endswith(".json"))
_FILE_LAYOUTS = {  # what each shipped config builds
    "zero1_bf16.json": ("deepspeed_bf16", "BF16_Optimizer"),
    "zero1_fp32.json": ("deepspeed_zero12", "DeepSpeedZeroOptimizer"),
    "zero2_bf16.json": ("deepspeed_zero12", "DeepSpeedZeroOptimizer"),
    "zero2_fp32.json": ("deepspeed_zero12", "DeepSpeedZeroOptimizer"),
    "zero3_bf16.json": ("deepspeed_zero3", "DeepSpeedZeroOptimizer_Stage3"),
    "zero3_fp32.json": ("deepspeed_zero3", "DeepSpeedZeroOptimizer_Stage3"),
}
ZERO3 = "DeepSpeedZeroOptimizer_Stage3"
TRAIN_CASES = [
    *(Case(f"file:{f}", file_config(f), kind=k, wrapper=w) for f, (k, w) in _FILE_LAYOUTS.items()),
    Case("stage0_fp32", ds_config(0), two_groups=True, kind="replicated", wrapper="TVLARS"),
    Case(
        "stage0_bf16",
        ds_config(0, bf16=True),
        kind="deepspeed_stage0",
        wrapper="FP16_UnfusedOptimizer",
        older=("BF16_Optimizer", "deepspeed_bf16"),  # DeepSpeed <= 0.17
    ),
    Case(
        "zero1_round_robin_aligned",
        ds_config(1, round_robin_gradients=True, parameter_alignment=True),
        two_groups=True,
        kind="deepspeed_zero12",
        wrapper="DeepSpeedZeroOptimizer",
    ),
    Case(
        "zero2_round_robin",
        ds_config(2, round_robin_gradients=True),
        two_groups=True,
        kind="deepspeed_zero12",
        wrapper="DeepSpeedZeroOptimizer",
    ),
    Case(
        "zero2_aligned",
        ds_config(2, parameter_alignment=True),
        kind="deepspeed_zero12",
        wrapper="DeepSpeedZeroOptimizer",
    ),
    Case(
        "zero3_sub_groups",
        ds_config(3, sub_group_size=20),
        two_groups=True,
        kind="deepspeed_zero3",
        wrapper=ZERO3,
    ),
    Case(
        "lars_zero1_clipped",
        ds_config(1, optimizer=("LARS", LARS), clipping=0.1),
        kind="deepspeed_zero12",
        wrapper="DeepSpeedZeroOptimizer",
    ),
    Case(
        "lamb_zero3",
        ds_config(3, optimizer=("LayerwiseLAMB", LAMB), sub_group_size=20),
        kind="deepspeed_zero3",
        wrapper=ZERO3,
    ),
]
CHECKPOINT_CASES = [
    Case("checkpoint_zero2", ds_config(2), run="checkpoint", two_groups=True, steps=4),
    Case(
        "checkpoint_zero3",
        ds_config(3, sub_group_size=20),
        run="checkpoint",
        two_groups=True,
        steps=4,
    ),
]
NAIVE = Case("naive_zero2", ds_config(2), run="naive")
BIND = Case("bind_zero2", ds_config(2), run="bind")
BAD_PARAMS = {
    "unknown_key": ({**TVLARS, "momentun": 0.9}, "momentun"),
    "nan": ({**TVLARS, "eta": math.nan}, "eta=nan"),
    "max_grad_norm": ({**TVLARS, "max_grad_norm": 1.0}, "gradient_clipping"),
}
BAD_CASES = [
    Case(f"bad_{name}", ds_config(2, optimizer=("TVLARS", params)), run="init_error")
    for name, (params, _) in BAD_PARAMS.items()
]
CASES = [*TRAIN_CASES, *CHECKPOINT_CASES, NAIVE, BIND, *BAD_CASES]


# --------------------------------------------------------------------------- in the ranks
class _AllReduceLog:
    """Records the process group of every ``all_reduce`` issued inside the basic optimizer's
    ``step()``, one list per ``step()`` call (DeepSpeed's own collectives run outside it)."""

    def __init__(self, optimizer):
        self.calls: list[list] = []
        self._inside = False
        inner_step = optimizer.step

        def step(*args, **kwargs):
            self.calls.append([])
            self._inside = True
            try:
                return inner_step(*args, **kwargs)
            finally:
                self._inside = False

        optimizer.step = step

    def __enter__(self):
        self._all_reduce = dist.all_reduce

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            if self._inside:
                self.calls[-1].append((group, tensor.numel()))
            return self._all_reduce(tensor, op=op, group=group, async_op=async_op)

        dist.all_reduce = all_reduce
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._all_reduce


def _engine(case: Case):
    import deepspeed

    model = make_model()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, case.two_groups), config=case.config
    )
    return engine


def _train_step(engine, rank: int, x: torch.Tensor, y: torch.Tensor) -> None:
    rows = slice(rank * MICRO, (rank + 1) * MICRO)
    dtype = next(engine.module.parameters()).dtype
    engine.backward(loss_fn(engine(x[rows].to(dtype)), y[rows]))
    engine.step()


def _full_params(engine) -> list[torch.Tensor]:
    """The whole parameters as the optimizer left them: the fp32 master weights (bf16 weights
    would round away most of a 3-step update)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = list(engine.module.parameters())
    if params[0].dtype == torch.float32:  # the master weights are the parameters themselves
        if engine.zero_optimization_stage() == 3:
            with deepspeed.zero.GatheredParameters(params):
                return [p.detach().clone() for p in params]
        return [p.detach().clone() for p in params]
    wrapper = engine.optimizer
    if type(wrapper).__name__ == "FP16_UnfusedOptimizer":  # stage 0: fp32 copies, same order
        masters = {
            id(lp): hp
            for lps, hps in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True)
            for lp, hp in zip(lps, hps, strict=True)
        }
        return [masters[id(p)].detach().clone() for p in params]
    # DeepSpeed's own gather (not valid under round_robin_gradients, unused with bf16 here).
    return [safe_get_full_fp32_param(p).detach().clone() for p in params]


def _step_counters(engine) -> dict:
    basic = engine.basic_optimizer
    masters = getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])
    return {
        "groups": [float(g["step"]) for g in basic.param_groups],
        "masters": [float(basic.state[t].get("step", math.nan)) for t in masters],
    }


def _ranks(group) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group or dist.group.WORLD))


def _units(engine) -> int:
    """How many times per training step DeepSpeed calls the basic optimizer's step()."""
    wrapper = type(engine.optimizer).__name__
    if wrapper == "DeepSpeedZeroOptimizer":
        return len(engine.optimizer.bit16_groups)
    if wrapper == ZERO3:
        return len(engine.optimizer.fp16_groups)
    return 1


def _norm_groups(engine) -> list:
    """The groups the layouts must reduce over: one per param group (ZeRO-1/2, BF16_Optimizer)
    or per sub-group (ZeRO-3; up to DeepSpeed 0.19.0 its data-parallel group for all)."""
    wrapper = engine.optimizer
    for name in ("real_dp_process_group", "sub_group_process_groups"):
        groups = getattr(wrapper, name, None)
        if groups:
            return groups
    return [getattr(wrapper, "dp_process_group", None)]


def _poison_zero3_padding(engine, rank: int) -> None:
    """ZeRO-3 pads each parameter's partition to partition_numel(); that tail holds whatever
    memory held before (the notes saw -2.27e38 in an fp32 master), often zeros here. Write a large
    finite value there so that a layout that does not mask it gets wrong norms."""
    wrapper = engine.optimizer
    for params, flat in zip(wrapper.fp16_groups, wrapper.fp32_partitioned_groups_flat, strict=True):
        offset = 0
        for p in params:
            n = p.partition_numel()
            valid = min(max(p.ds_numel - rank * n, 0), n)
            flat.data[offset + valid : offset + n] = 1e3
            offset += n


def _train(rank: int, case: Case, engine=None, data=None) -> dict:
    if engine is None:
        engine = _engine(case)
        if engine.zero_optimization_stage() == 3:
            _poison_zero3_padding(engine, rank)
    log = _AllReduceLog(engine.basic_optimizer)
    expected = _norm_groups(engine)
    with log:
        for x, y in data or batches(case.steps):
            _train_step(engine, rank, x, y)
    basic = engine.basic_optimizer
    return {
        "params": _full_params(engine),
        "wrapper": type(engine.optimizer).__name__,
        "kinds": sorted({plan.layout.kind for plan in basic._plans.values()}),
        "all_reduces": [
            [(any(g is e for e in expected), _ranks(g), n) for g, n in call] for call in log.calls
        ],
        "units": _units(engine),
        "counters": _step_counters(engine),
        "stats": basic.layer_stats().to_dict(),
    }


def _naive(rank: int, case: Case) -> dict:
    """The same run with per-partition norms: what any layer-wise optimizer unaware of ZeRO does."""
    from tvlars_scale.layouts import GroupLayout, Layer, Segment, register_adapter

    def per_tensor(params, ctx):
        if all(ctx.is_original(p) for p in params):
            return None
        layers = [Layer(f"flat{j}", (1, p.numel())) for j, p in enumerate(params)]
        return GroupLayout(layers, [Segment(j, j) for j in range(len(params))], kind="naive")

    handle = register_adapter("naive", per_tensor)
    try:
        return _train(rank, case)
    finally:
        handle.remove()


def _checkpoint(rank: int, case: Case, workdir: str) -> dict:
    data = batches(case.steps)
    half = case.steps // 2
    first = _engine(case)
    _train(rank, case, first, data[:half])
    first.save_checkpoint(workdir, tag=case.name)
    uninterrupted = _train(rank, case, first, data[half:])
    resumed = _engine(case)
    resumed.load_checkpoint(workdir, tag=case.name)
    loaded = _step_counters(resumed)
    return {**uninterrupted, "loaded": loaded, "resumed": _train(rank, case, resumed, data[half:])}


def _bind(rank: int, case: Case) -> dict:
    """Step the basic optimizer outside DeepSpeed's call chain: without a binding the flat
    partition is unmappable (an error naming the fix); after bind(engine) it is mapped."""
    from tvlars_scale.layouts import UnmappableLayoutError

    engine = _engine(case)
    flat = engine.optimizer.single_partition_of_fp32_groups[0]
    flat.grad = torch.ones_like(flat)
    try:
        engine.basic_optimizer.step()
        unbound = None
    except UnmappableLayoutError as exc:
        unbound = str(exc)
    tds.bind(engine)
    engine.basic_optimizer.step()
    plans = engine.basic_optimizer._plans.values()
    return {"unbound": unbound, "kinds": sorted({plan.layout.kind for plan in plans})}


def _init_error(rank: int, case: Case) -> dict:
    try:
        _engine(case)
    except Exception as exc:
        return {"error_type": type(exc).__name__, "message": str(exc)}
    return {"error_type": None, "message": None}


def _unknown_zero_options(config: dict) -> list[str]:
    """The ``zero_optimization`` keys of ``config`` that the installed DeepSpeed does not know
    (options newer than it, e.g. ``parameter_alignment`` before 0.19.x)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    return [key for key in config.get("zero_optimization", {}) if key not in known]


def _world(rank: int, world_size: int, cases: list[Case], workdir: str) -> dict:
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 2-minute JIT build
    runners = {"train": _train, "naive": _naive, "bind": _bind, "init_error": _init_error}
    results = {}
    for case in cases:
        unknown = _unknown_zero_options(case.config)
        if unknown:
            results[case.name] = {
                "unsupported": f"DeepSpeed {deepspeed.__version__} has no "
                f"zero_optimization.{unknown[0]} (a newer option)"
            }
            continue
        # An exception ends this rank (and so the world, instead of leaving the other rank
        # waiting in a collective); the test then fails with this rank's traceback.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            started = time.perf_counter()
            try:
                if case.run == "checkpoint":
                    result = _checkpoint(rank, case, workdir)
                else:
                    result = runners[case.run](rank, case)
            except UnmappableLayoutError as exc:
                if REFUSED not in str(exc):
                    raise
                # Every rank refuses at its first step, before any collective of ours.
                results[case.name] = {"unsupported": str(exc), "refused": True}
                continue
        result["seconds"] = time.perf_counter() - started
        result["warnings"] = [str(w.message) for w in caught if "tvlars_scale" in str(w.message)]
        results[case.name] = result
    return results


# --------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    started = time.perf_counter()
    results = run_ranks(_world, WORLD, CASES, str(tmp_path_factory.mktemp("ds_checkpoints")))
    seconds = time.perf_counter() - started
    print(f"\nDeepSpeed world: {len(CASES)} cases in {seconds:.1f} s")
    for name in results[0]:
        print(f"  {name}: {results[0][name].get('seconds', 0.0):.1f} s")
    return results


def _result(world, name: str, rank: int = 0) -> dict:
    result = world[rank][name]
    if "unsupported" in result:
        pytest.skip(result["unsupported"])
    return result


#: What the ZeRO-3 layout says on a DeepSpeed older than the releases where it was verified.
REFUSED = "ZeRO-3 (DeepSpeedZeroOptimizer_Stage3) needs deepspeed >= 0.19"


def test_zero3_refused_before_deepspeed_0_19(world):
    """On DeepSpeed 0.16.9 ZeRO-3 runs intermittently differed from one process: older releases
    are refused at the first step; from 0.19 every ZeRO-3 case runs."""
    import deepspeed

    zero3 = [c.name for c in CASES if c.config.get("zero_optimization", {}).get("stage") == 3]
    assert zero3
    refused = {name for name in zero3 if world[0][name].get("refused")}
    old = TorchVersion(deepspeed.__version__) < "0.19"
    assert refused == (set(zero3) if old else set())


def _ran(world, cases: list[Case]) -> list[Case]:
    """The cases the installed DeepSpeed could run."""
    return [case for case in cases if "unsupported" not in world[0][case.name]]


def _reference(case: Case, steps: int | None = None):
    optimizer = case.config["optimizer"]
    return reference(
        optimizer["type"],
        optimizer["params"],
        steps or case.steps,
        two_groups=case.two_groups,
        clipping=case.config.get("gradient_clipping", 0.0),
    )


def _assert_matches(case: Case, got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    if case.bf16:
        assert update_relative_error(got, want) <= BF16_TOL
    else:
        assert max_relative_error(got, want) <= FP32_TOL


@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda c: c.name)
def test_matches_single_process(world, case):
    want, _ = _reference(case)
    for rank in range(WORLD):
        result = _result(world, case.name, rank)
        assert (result["wrapper"], result["kinds"]) in [
            (case.wrapper, [case.kind]),
            (case.older[0], [case.older[1]]),
        ]
        _assert_matches(case, result["params"], want)


@pytest.mark.parametrize("case", [c for c in TRAIN_CASES if not c.bf16], ids=lambda c: c.name)
def test_layer_stats_are_true_per_layer_norms(world, case):
    _, want = _reference(case)
    got = _result(world, case.name)["stats"]
    assert got.keys() == want.keys()  # every layer, named as in the model
    for name, row in want.items():
        for key in ("lwn", "lgn", "trust_ratio", "scale"):
            assert got[name][key] == pytest.approx(row[key], rel=1e-5), (name, key)


def test_per_partition_norms_fail_tolerance(world):
    """The negative control: per-partition norms (what a ZeRO-unaware LARS computes) are far
    outside the fp32 tolerance that the exact layouts meet."""
    want, _ = _reference(NAIVE)
    result = _result(world, NAIVE.name)
    assert result["kinds"] == ["naive"]
    assert max_relative_error(result["params"], want) > 100 * FP32_TOL


def test_norms_take_one_all_reduce_per_group_per_step_call(world):
    for case in _ran(world, TRAIN_CASES):
        result = _result(world, case.name)
        calls = result["all_reduces"]
        assert len(calls) == case.steps * result["units"], case.name
        if result["kinds"] in (["replicated"], ["deepspeed_stage0"]):
            # whole params: no norm to reduce, only the step decision (1 float) over the world
            assert all(call == [(False, (0, 1), 1)] for call in calls), case.name
        elif case.name.startswith("lamb"):
            # LAMB takes the decision (1 float, over the world) before its local pass, then
            # reduces the norms (2 floats per layer) over the wrapper's group
            assert all(len(call) == 2 and call[0][1:] == ((0, 1), 1) for call in calls)
            assert all(call[1][:2] == (True, (0, 1)) and call[1][2] % 2 == 0 for call in calls)
        else:
            # exactly one collective, over the wrapper's data-parallel / partition group (the
            # whole world here, so the decision rides along: 2 floats per layer + 1)
            assert all(len(call) == 1 and call[0][:2] == (True, (0, 1)) for call in calls)
            assert all(call[0][2] % 2 == 1 for call in calls), case.name


def test_step_counters_count_training_steps(world):
    """ZeRO calls step() once per group or sub-group; FP16_UnfusedOptimizer steps once at
    start-up with zero gradients. Each counter still counts training steps."""
    for case in _ran(world, TRAIN_CASES):
        counters = _result(world, case.name)["counters"]
        assert set(counters["groups"]) == {case.steps}, case.name
        assert set(counters["masters"]) <= {case.steps}, case.name
    sub_groups = _result(world, "zero3_sub_groups")
    assert sub_groups["units"] > 2 and len(sub_groups["counters"]["masters"]) > 2


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=lambda c: c.name)
def test_checkpoint_resume_equals_uninterrupted(world, case):
    for rank in range(WORLD):
        result = _result(world, case.name, rank)
        half = case.steps // 2
        assert set(result["loaded"]["groups"]) == {half}
        assert set(result["loaded"]["masters"]) <= {half}
        resumed = result["resumed"]
        assert resumed["counters"] == result["counters"]
        for got, want in zip(resumed["params"], result["params"], strict=True):
            assert torch.equal(got, want)
    want, _ = _reference(case)
    _assert_matches(case, _result(world, case.name)["params"], want)


def test_bind_when_stepped_outside_deepspeed(world):
    for rank in range(WORLD):
        result = _result(world, BIND.name, rank)
        assert "tvlars_scale.deepspeed.bind(engine)" in result["unbound"]
        assert result["kinds"] == ["deepspeed_zero12"]


@pytest.mark.parametrize("name", BAD_PARAMS)
def test_bad_json_params_fail_clearly(world, name):
    _, needle = BAD_PARAMS[name]
    for rank in range(WORLD):
        result = _result(world, f"bad_{name}", rank)
        assert result["error_type"] in ("TypeError", "ValueError")
        assert needle in result["message"]


def test_gradient_clipping_warns_once(world):
    clipped = _result(world, "lars_zero1_clipped")
    assert len(clipped["warnings"]) == 1
    assert "gradient_clipping=0.1" in clipped["warnings"][0]
    assert "trust ratio" in clipped["warnings"][0]
    assert _result(world, "lars_zero1_clipped", rank=1)["warnings"] == []  # rank 0 only
    unclipped = [c for c in _ran(world, TRAIN_CASES) if not c.config["gradient_clipping"]]
    assert all(_result(world, c.name)["warnings"] == [] for c in unclipped)


def test_every_ds_config_is_exercised():
    assert sorted(_FILE_LAYOUTS) == CONFIG_FILES


# --------------------------------------------------------------------------- accelerate
def test_accelerate_launch_with_ds_config(tmp_path):
    """`accelerate launch --use_deepspeed` with a ds_configs file and DummyOptim, 2 CPU ranks."""
    pytest.importorskip("transformers")  # accelerate + DeepSpeed needs it (notes, section 5)
    config = os.path.join(DS_CONFIGS, "zero2_fp32.json")
    out = tmp_path / "params.pt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--use_deepspeed",
        "--deepspeed_config_file",
        config,
        "--num_processes",
        str(WORLD),
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--dynamo_backend",
        "no",
        os.path.join(ROOT, "tests", "deepspeed_accelerate_script.py"),
        str(out),
    ]
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    print(f"\naccelerate launch: {time.perf_counter() - started:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = torch.load(out)
    assert result["distributed_type"] == "DEEPSPEED" and result["num_processes"] == WORLD
    assert result["wrapper"] == "DeepSpeedZeroOptimizer"
    assert result["kinds"] == ["deepspeed_zero12"]
    params = tds.load_config(
        config,
        lr=result["lr"],
        weight_decay=result["weight_decay"],
        train_micro_batch_size_per_gpu=MICRO,
        gradient_accumulation_steps=1,
    )["optimizer"]["params"]
    want, _ = reference("TVLARS", params, result["steps"])
    assert max_relative_error(result["params"], want) <= FP32_TOL
    assert update_relative_error(result["params"], want) <= 1e-2  # eta=1e-3: small updates
