"""torchtitan: ``LayerwiseOptimizersContainer`` (tvlars_scale.torchtitan) built and stepped by
torchtitan's own container code, checkpointed through its flat state dict and DCP.

- The config: our three names, torchtitan's ``implementation`` mapped onto ``fused``, and every
  refusal (an unknown or mixed name, a misspelt argument, a value, a run option in the wrong
  place, bfloat16 states, groups that disagree on ``fused``).
- torchtitan's checkpoint fake step (zero gradients, lr 0, ``init_optim_state``) leaves weights,
  state and counters as a fresh optimizer has them, and a zero-gradient step at the real lr with
  weight decay leaves a trained optimizer's bit for bit: the "all gradients zero: no-op" rule.
- One spawned 2-rank world (gloo) trains the model of tests/test_parallelism.py for 3 steps,
  compared with one process on the same global batches (``equivalence``): FSDP2 (TVLARS, LARS,
  LAMB), 2 pipeline stages (one model part per rank), and 4 virtual stages (two parts per rank,
  one optimizer over both); a NaN in the last stage skips the step on every stage. With the
  all-reduces dropped (per-shard norms, per-rank decisions) FSDP2 must miss and the stages must
  disagree. A DCP save after 2 steps, loaded into a fresh model and container, then the third
  step, equals the uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from equivalence import (
    OPTIMIZERS,
    assert_matches,
    misses,
    recorded_all_reduce,
    result_of,
)
from multirank import run_ranks
from test_parallelism import (
    INTERLEAVED_MODULES,
    NEEDS_PIPELINES,
    NO_PIPELINES,
    STAGE_MODULES,
    STEPS,
    batches,
    full,
    make_net,
    poison_head,
    reference,
    stage_module,
    stage_names,
)
from torch import nn

from tvlars_scale import LAMB, LARS, TVLARS

titan = pytest.importorskip(
    "tvlars_scale.torchtitan",
    reason='torchtitan >= 0.3 is not installed: pip install -e ".[torchtitan]" (Python >= 3.11)',
    exc_type=ImportError,
)
from torchtitan.components.optimizer import (  # noqa: E402  (after the skip)
    LRSchedulersContainer,
    ParamGroupConfig,
)
from torchtitan.components.optimizer.utils import init_optim_state  # noqa: E402

Container = titan.LayerwiseOptimizersContainer
CLASSES = {"TVLARS": TVLARS, "LARS": LARS, "LAMB": LAMB}


def config(opt_name: str, decide_on_host: bool | None = None, **options):
    """``layerwise_config`` with equivalence's settings; the eager step unless ``options`` say."""
    cfg = titan.layerwise_config(
        opt_name, **{"implementation": "foreach", **OPTIMIZERS[opt_name][1], **options}
    )
    if decide_on_host is None:
        return cfg
    run_options = {opt_name: {"decide_on_host": decide_on_host}}
    return dataclasses.replace(cfg, optimizer_factory_kwargs_by_name=run_options)


def group(pattern: str = r".*", name: str = "LARS", **kwargs) -> ParamGroupConfig:
    return ParamGroupConfig(pattern=pattern, optimizer_name=name, optimizer_kwargs=kwargs)


def train(optimizers, forward_backward, steps=STEPS, skip_reduce=False, schedulers=None):
    """``steps`` training steps; the all-reduces each ``step()`` issued (dropped if asked)."""
    per_step = []
    for step in range(steps):
        optimizers.zero_grad()
        forward_backward(step)
        calls = []
        with recorded_all_reduce(calls, skip=skip_reduce):
            optimizers.step()
        if schedulers is not None:
            schedulers.step()
        per_step.append(calls)
    return per_step


def snapshot(net: nn.Module, optimizers) -> dict:
    """Weights, every state tensor and both counters of every group, copied."""
    (opt,) = optimizers.optimizers
    return {
        "weights": {n: p.detach().clone() for n, p in net.named_parameters()},
        "state": {
            (n, key): value.clone()
            for n, p in net.named_parameters()
            for key, value in opt.state[p].items()
        },
        "counters": [(g["step"].clone(), g["skipped_steps"].clone()) for g in opt.param_groups],
    }


def assert_identical(after: dict, before: dict) -> None:
    assert after.keys() == before.keys()
    for part in ("weights", "state"):
        assert after[part].keys() == before[part].keys(), part
        for key, value in after[part].items():
            assert torch.equal(value, before[part][key]), (part, key)
    assert all(
        torch.equal(a, b)
        for counters in zip(after["counters"], before["counters"], strict=True)
        for a, b in zip(*counters, strict=True)
    )


def plain_training(net: nn.Module):
    data = batches()
    return lambda step: F.mse_loss(net(data[step][0]), data[step][1]).backward()


# ---------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("opt_name", CLASSES)
def test_the_config_builds_one_of_ours_over_every_model_part(opt_name):
    """Two model parts (pipeline stages on one rank): one optimizer, a group per part, the
    hyperparameters and torchtitan's parameter names in the groups, no implementation flags."""
    parts = [stage_module(s) for s in range(len(STAGE_MODULES))]
    optimizers = config(opt_name, weight_decay=0.25).build(model_parts=parts)
    (opt,) = optimizers.optimizers
    assert type(opt) is CLASSES[opt_name] and len(optimizers) == 1
    assert [g["param_names"] for g in opt.param_groups] == [stage_names(0), stage_names(1)]
    assert all(g["weight_decay"] == 0.25 for g in opt.param_groups)
    assert not {"fused", "foreach"} & {k for g in opt.param_groups for k in g}


@pytest.mark.parametrize(
    ("implementation", "overrides", "fused"),
    [
        ("fused", {}, True),
        ("foreach", {}, False),
        ("for-loop", {}, False),
        ("fused", {"fused": False}, False),  # torchtitan's per-group override, in every group
        ("foreach", {"fused": True, "foreach": False}, True),
    ],
)
def test_implementation_maps_onto_fused(implementation, overrides, fused):
    groups = [group(r"^0\.", **overrides), group(r".*", **overrides)]
    cfg = Container.Config(param_groups=groups, implementation=implementation)
    (opt,) = cfg.build(model_parts=[make_net()]).optimizers
    assert opt.fused is fused


def test_run_options_come_from_the_factory_kwargs():
    cfg = Container.Config(
        param_groups=[group()],
        optimizer_factory_kwargs_by_name={"LARS": {"decide_on_host": False, "model_group": (0,)}},
    )
    (opt,) = cfg.build(model_parts=[make_net()]).optimizers
    assert opt.decide_on_host is False and opt.model_group == (0,)


REFUSED = {
    "torchtitan's own optimizer": (
        lambda: titan.layerwise_config("AdamW", lr=1e-3),
        "param_groups[0] (pattern '.*'): invalid optimizer_name='AdamW'; expected one of "
        "'TVLARS', 'LARS', 'LAMB'",
    ),
    "two optimizers": (
        lambda: Container.Config(param_groups=[group(r"^0\."), group(name="LAMB")]),
        "param_groups[1] (pattern '.*') names optimizer_name='LAMB', param_groups[0] 'LARS'; "
        "expected one optimizer for every group",
    ),
    "misspelt argument": (
        lambda: titan.layerwise_config("TVLARS", weight_deacy=0.1),
        "invalid optimizer_kwargs key 'weight_deacy' (value 0.1); TVLARS takes lr, momentum, "
        "weight_decay",
    ),
    "invalid value": (
        lambda: titan.layerwise_config("LARS", momentum=1.5),
        "param_groups[0] (pattern '.*'): LARS: invalid momentum=1.5; expected a finite number "
        "in [0, 1)",
    ),
    "run option as a hyperparameter": (
        lambda: titan.layerwise_config("LAMB", decide_on_host=True),
        "(run options go in optimizer_factory_kwargs_by_name)",
    ),
    "bfloat16 Adam states": (
        lambda: titan.layerwise_config("LAMB", implementation="fused_opt_states_bf16"),
        "invalid implementation='fused_opt_states_bf16' (bfloat16 Adam moments; our state "
        "keeps its parameter's dtype); expected one of 'fused', 'foreach', 'for-loop'",
    ),
    "groups disagree on fused": (
        lambda: Container.Config(param_groups=[group(r"^0\.", fused=False), group()]),
        "the groups resolve to different fused values (param_groups[0] (pattern '^0\\\\.'): "
        "fused=False, param_groups[1] (pattern '.*'): fused=True)",
    ),
    "fused and foreach": (
        lambda: titan.layerwise_config("LARS", foreach=True),
        "resolves to fused=True and foreach=True; expected at most one",
    ),
    "a flag that is not a bool": (
        lambda: titan.layerwise_config("LARS", fused="yes"),
        "invalid fused='yes'; expected True or False",
    ),
    "factory kwargs for another optimizer": (
        lambda: Container.Config(
            param_groups=[group()], optimizer_factory_kwargs_by_name={"AdamW": {}}
        ),
        "invalid optimizer_factory_kwargs_by_name key 'AdamW'; expected 'LARS'",
    ),
    "a hyperparameter as a run option": (
        lambda: Container.Config(
            param_groups=[group()], optimizer_factory_kwargs_by_name={"LARS": {"lr": 1.0}}
        ),
        "invalid optimizer_factory_kwargs_by_name['LARS'] key 'lr' (value 1.0); expected "
        "decide_on_host or model_group",
    ),
    "no param groups": (
        lambda: Container.Config().build(model_parts=[make_net()]),
        "param_groups is empty; expected at least one ParamGroupConfig",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_does_not_map_is_refused(case):
    make, message = REFUSED[case]
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value).startswith("LayerwiseOptimizersContainer: ")
    assert message in str(info.value)


# ---------------------------------------------------------------------------------- fake step
DECISIONS = [pytest.param(True, id="host"), pytest.param(False, id="device")]


@pytest.mark.parametrize("decide_on_host", DECISIONS)
@pytest.mark.parametrize("opt_name", CLASSES)
def test_the_checkpoint_fake_step_changes_nothing(opt_name, decide_on_host):
    """torchtitan's ``state_dict()`` first steps a fresh optimizer on zero gradients at lr 0
    (``init_optim_state``): the state it creates is what a fresh optimizer allocates (zeros,
    counters at 0), the weights do not move, and training afterwards is bit for bit a run
    without it."""

    def fresh():
        net = make_net()
        return net, config(opt_name, decide_on_host).build(model_parts=[net])

    net, optimizers = fresh()
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    flat = optimizers.state_dict()
    after = snapshot(net, optimizers)
    assert after["state"], "init_optim_state created no state: DCP would load none"
    assert all(torch.equal(after["weights"][n], w) for n, w in weights.items())
    assert all(not v.any() for v in after["state"].values())
    assert [(float(s), float(k)) for s, k in after["counters"]] == [(0.0, 0.0)]
    assert all(p.grad is None for p in net.parameters())
    buffers = CLASSES[opt_name].state_buffers
    assert {k for k in flat if k.startswith("state.")} == {
        f"state.{n}.{b}" for n in weights for b in buffers
    }  # torchtitan's flat, FQN-keyed layout

    train(optimizers, plain_training(net))
    untouched_net, untouched = fresh()
    train(untouched, plain_training(untouched_net))
    assert_identical(snapshot(net, optimizers), snapshot(untouched_net, untouched))


@pytest.mark.parametrize("decide_on_host", DECISIONS)
@pytest.mark.parametrize("opt_name", CLASSES)
def test_a_zero_gradient_step_is_a_no_op_despite_weight_decay(opt_name, decide_on_host):
    """The rule the fake step relies on, at the real lr: with weight decay, d = 0 + wd*w is not
    zero, yet a step whose gradients are all zero moves nothing and counts nothing."""
    net = make_net()
    optimizers = config(opt_name, decide_on_host, weight_decay=0.1).build(model_parts=[net])
    train(optimizers, plain_training(net), steps=2)
    before = snapshot(net, optimizers)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizers.step()
    assert_identical(snapshot(net, optimizers), before)
    # and init_optim_state itself leaves a trained optimizer alone (its state exists)
    optimizers.zero_grad()
    init_optim_state(optimizers.optimizers[0])
    assert_identical(snapshot(net, optimizers), before)


# ---------------------------------------------------------------------------------- 2 ranks
def fsdp2_net(ws: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (ws,))
    net = make_net()
    for index in (0, 2, 4):  # the head's 3 rows split 2/1
        fully_shard(net[index], mesh=mesh)
    return fully_shard(net, mesh=mesh)


def fsdp2_training(net: nn.Module, rank: int, ws: int):
    mine = [(x.chunk(ws)[rank], y.chunk(ws)[rank]) for x, y in batches()]
    return lambda step: F.mse_loss(net(mine[step][0]), mine[step][1]).backward()


def full_params(net: nn.Module) -> dict:
    return {n: full(p) for n, p in net.named_parameters()}


def run_fsdp2(rank, ws, opt_name, skip_reduce=False):
    net = fsdp2_net(ws)
    optimizers = config(opt_name).build(model_parts=[net])
    calls = train(optimizers, fsdp2_training(net, rank, ws), skip_reduce=skip_reduce)
    return result_of(optimizers.optimizers[0], full_params(net), calls)


def run_pipeline(rank, ws, opt_name, modules=STAGE_MODULES, poison=False, skip_reduce=False):
    """``len(modules)`` stages, ``len(modules) // ws`` model parts per rank (torchtitan's
    ``model_parts``), one container over them; GPipe for one part per rank, interleaved 1F1B
    for several."""
    from torch.distributed.pipelining import (
        PipelineStage,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    n_stages = len(modules)
    mine = range(rank, n_stages, ws)
    parts = [stage_module(s, modules) for s in mine]
    cpu = torch.device("cpu")
    stages = [PipelineStage(p, s, n_stages, cpu) for s, p in zip(mine, parts, strict=True)]
    if len(stages) == 1:
        schedule = ScheduleGPipe(stages[0], n_microbatches=2, loss_fn=F.mse_loss)
    else:
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=2, loss_fn=F.mse_loss)
    optimizers = config(opt_name).build(model_parts=parts)
    data = batches()

    def forward_backward(step):
        x, y = data[step]
        schedule.step(x) if rank == 0 else schedule.step(target=y)
        for part in parts:
            if poison and isinstance(part[4], nn.Linear):  # the head: the last stage
                poison_head(step, part)

    calls = train(optimizers, forward_backward, skip_reduce=skip_reduce)
    params = {n: p for part in parts for n, p in part.named_parameters()}
    result = result_of(optimizers.optimizers[0], params, calls)
    result["state_keys"] = sorted(k for k in optimizers.state_dict() if k.startswith("state."))
    return result


def run_dcp_round_trip(rank, ws, opt_name, folder):
    """Save (model, optimizers, LR schedulers, as torchtitan's checkpointer does) after 2 steps;
    a fresh model and container load it and take the third step. Returns both runs."""
    import torch.distributed.checkpoint as dcp

    def fresh():
        net = fsdp2_net(ws)
        optimizers = config(opt_name).build(model_parts=[net])
        constant = LRSchedulersContainer.Config(warmup_steps=0, decay_ratio=0.0)
        return net, optimizers, constant.build(optimizers=optimizers, training_steps=STEPS)

    def state(net, optimizers, schedulers):
        return {"model": net.state_dict(), "optimizer": optimizers, "lr_scheduler": schedulers}

    net, optimizers, schedulers = fresh()
    training = fsdp2_training(net, rank, ws)
    train(optimizers, training, steps=STEPS, schedulers=schedulers)
    uninterrupted = result_of(optimizers.optimizers[0], full_params(net), [])

    net, optimizers, schedulers = fresh()
    train(optimizers, fsdp2_training(net, rank, ws), steps=2, schedulers=schedulers)
    dcp.save(state(net, optimizers, schedulers), checkpoint_id=folder)

    net, optimizers, schedulers = fresh()  # initial weights, no optimizer state
    saved = state(net, optimizers, schedulers)
    dcp.load(saved, checkpoint_id=folder)  # loads the container and schedulers too (Stateful)
    net.load_state_dict(saved["model"])
    training = fsdp2_training(net, rank, ws)
    train(optimizers, lambda step: training(step + 2), steps=1, schedulers=schedulers)
    resumed = result_of(optimizers.optimizers[0], full_params(net), [])
    return {"uninterrupted": uninterrupted, "resumed": resumed}


SCENARIOS = {
    "fsdp2-TVLARS": (run_fsdp2, ("TVLARS",)),
    "fsdp2-LARS": (run_fsdp2, ("LARS",)),
    "fsdp2-LAMB": (run_fsdp2, ("LAMB",)),
    "naive-fsdp2-TVLARS": (run_fsdp2, ("TVLARS", True)),
}
PIPELINES = {
    "pp-TVLARS": (run_pipeline, ("TVLARS",)),
    "pp_nan-LARS": (run_pipeline, ("LARS", STAGE_MODULES, True)),
    "interleaved_nan-TVLARS": (run_pipeline, ("TVLARS", INTERLEAVED_MODULES, True)),
    "naive-pp_nan-LARS": (run_pipeline, ("LARS", STAGE_MODULES, True, True)),
}


def world(rank, ws, folder):
    scenarios = SCENARIOS if NO_PIPELINES else {**SCENARIOS, **PIPELINES}
    out = {name: fn(rank, ws, *args) for name, (fn, args) in scenarios.items()}
    out["dcp-TVLARS"] = run_dcp_round_trip(rank, ws, "TVLARS", folder)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(world, 2, str(tmp_path_factory.mktemp("torchtitan_dcp")))


@pytest.mark.parametrize("opt_name", CLASSES)
def test_fsdp2_equals_one_process(two_ranks, opt_name):
    for result in two_ranks:
        assert_matches(result[f"fsdp2-{opt_name}"], reference(opt_name))
        # one all-reduce per step: 8 layers' two sums + the decision (LAMB decides first)
        sizes = [[n for _, n in step] for step in result[f"fsdp2-{opt_name}"]["calls"]]
        assert sizes == [[1, 16] if opt_name == "LAMB" else [17]] * STEPS


def test_fsdp2_without_the_reduction_misses(two_ranks):
    """The control: per-shard norms and per-rank decisions are outside the tolerance."""
    assert all(misses(result["naive-fsdp2-TVLARS"], reference("TVLARS")) for result in two_ranks)


@NEEDS_PIPELINES
@pytest.mark.parametrize("scenario", ["pp-TVLARS", "pp_nan-LARS", "interleaved_nan-TVLARS"])
def test_pipeline_stages_equal_one_process(two_ranks, scenario):
    opt_name = scenario.rsplit("-", 1)[1]
    ref = reference(opt_name, poisoned="nan" in scenario)
    for result in two_ranks:
        run = result[scenario]
        assert_matches(run, ref)
        # torchtitan's flat layout: this rank's parameters only, by their model-wide names
        momentum = CLASSES[opt_name].state_buffers[0]
        assert run["state_keys"] == sorted(f"state.{n}.{momentum}" for n in run["params"])


@NEEDS_PIPELINES
def test_a_nan_in_one_stage_skips_the_step_on_every_stage(two_ranks):
    """Stage 1's NaN (the head) skips step 2 on stage 0 as well; with two parts per rank one
    ``step()`` decides for both (one scalar all-reduce per step). With the all-reduces dropped,
    stage 0 steps on and the stages disagree."""
    for result in two_ranks:
        pp = result["pp_nan-LARS"]
        assert (pp["steps"], pp["skipped"]) == ([STEPS - 1.0], [1.0])
        interleaved = result["interleaved_nan-TVLARS"]
        assert (interleaved["steps"], interleaved["skipped"]) == ([STEPS - 1.0] * 2, [1.0] * 2)
        assert interleaved["calls"] == [[((0, 1), 1)]] * STEPS
    naive = [result["naive-pp_nan-LARS"] for result in two_ranks]
    assert [(r["steps"], r["skipped"]) for r in naive] == [([3.0], [0.0]), ([2.0], [1.0])]


def test_dcp_round_trip_equals_an_uninterrupted_run(two_ranks):
    for result in two_ranks:
        runs = result["dcp-TVLARS"]
        resumed, uninterrupted = runs["resumed"], runs["uninterrupted"]
        assert (resumed["steps"], resumed["skipped"]) == ([float(STEPS)], [0.0])
        for name, value in uninterrupted["params"].items():
            assert torch.equal(resumed["params"][name], value), name
        assert resumed["stats"] == uninterrupted["stats"]
        assert_matches(resumed, reference("TVLARS"))
