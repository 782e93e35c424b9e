"""transformers' native distributed models (issue #26): TVLARS and LAMB on what
``from_pretrained(..., distributed_config=...)`` returns, on CPU/gloo.

transformers 5.24.0 shards a model itself at load time: tensor parallelism from the model's
``tp_plan``, then FSDP2 over the ``fsdp`` dim of a ``("fsdp", "tp")`` mesh, with no accelerate
``prepare()``; the HF Trainer does not take such a model yet (huggingface/transformers#48210).
A tiny random Llama (no download: its checkpoint is written here first) with an odd vocabulary
(61 rows: the embedding and the head split unevenly) is loaded so on 4 CPU ranks, where
transformers allows both layouts:

- ``DistributedConfig(tp_size=2, fsdp_size=2)``: ``Shard``, ``_StridedShard`` and ``Replicate``
  placements on the 2-D mesh, the norms' on the ``fsdp`` dim alone. TVLARS and LAMB take 3
  steps on this rank's half of each global batch (the tp pair shares it) and equal one process;
  with the reduction dropped TVLARS misses. The optimizer is saved after 2 steps and loaded
  into a model reloaded from the saved checkpoint, with transformers' own helpers
  (``save_pretrained(..., distributed_checkpoint=True)``,
  ``transformers.distributed.save_optimizer_distributed`` / ``load_optimizer_distributed``,
  DCP underneath); its third step equals the uninterrupted run's.
- ``DistributedConfig(tp_plan="auto")`` (what ``from_pretrained(..., tp_plan="auto")``, a
  spelling transformers deprecates, builds), tp over the 4 ranks: the vocab-parallel
  embedding's ``Shard(0)`` weight gets a ``Replicate`` gradient, which the ``dtensor`` layout
  slices (tests/test_dtensor_grad_slicing.py). TVLARS equals one process, with one all-reduce
  per step, and misses without it. (Issue #26 met it on 2 ranks; the same code path runs here
  in the one world, which saves starting 2 more processes that load transformers.)

The sharded runs and the single process compute the loss from the logits with one function.
About 50 s on 2 idle cores: starting 4 processes that load transformers, then the first step's
warm-up (10 s); the steps themselves take well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from equivalence import (
    OPTIMIZERS,
    assert_matches,
    make_optimizer,
    misses,
    recorded_all_reduce,
    result_of,
    single_process,
)
from multirank import run_ranks

pytest.importorskip("transformers")

VOCAB, SEQ, GLOBAL_BATCH, STEPS, SAVED_AFTER = 61, 8, 4, 3, 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a checkpoint, loaded by every run."""
    pytest.importorskip(
        "transformers.distributed.checkpoint",
        reason="this transformers has no DistributedConfig(fsdp_size=...) or optimizer helpers "
        "(transformers 5.24 has them)",
    )
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,  # tp_plan="auto" over 4 ranks: a head per rank
        max_position_embeddings=2 * SEQ,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]
    return [(x, x) for x in ids]


def lm_loss(output, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, a mean over this batch's tokens (every rank's batch has as
    many, so the mean of the fsdp ranks' means is the global one)."""
    return F.cross_entropy(output.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def load(path: Path, **distributed: Any):
    """The checkpoint, sharded as ``DistributedConfig(**distributed)`` says (none: whole)."""
    from transformers import LlamaForCausalLM
    from transformers.distributed import DistributedConfig

    config = DistributedConfig(**distributed) if distributed else None
    return LlamaForCausalLM.from_pretrained(path, distributed_config=config)


def dp_share(model, ids: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch. transformers lays the ranks out as
    ``(pp, dp_replicate, fsdp, tp)``, tp innermost: a tp group is consecutive ranks, which share
    one part."""
    parallel = model.config.distributed_config
    return ids.chunk(parallel.dp_size)[dist.get_rank() // parallel.tp_size]


def train(model, opt, data, skip_reduce: bool = False) -> list[list]:
    calls = []
    for ids, _ in data:
        ids = dp_share(model, ids)
        opt.zero_grad()
        lm_loss(model(input_ids=ids), ids).backward()
        calls.append([])
        with recorded_all_reduce(calls[-1], skip=skip_reduce):
            opt.step()
    return calls


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def finished(model, opt, calls) -> dict[str, Any]:
    result = result_of(opt, {n: full(p) for n, p in model.named_parameters()}, calls)
    result["placements"] = {
        n: str(getattr(p, "placements", None)) for n, p in model.named_parameters()
    }
    return result


def run(path: Path, opt_name: str, layout: dict, skip_reduce: bool = False) -> dict[str, Any]:
    model = load(path, **layout)
    opt = make_optimizer(opt_name, model.named_parameters())
    calls = train(model, opt, batches(), skip_reduce)
    result = finished(model, opt, calls)
    # the gradients the last step saw, as transformers and FSDP2 left them
    result["grad_placements"] = {
        n: str(getattr(p.grad, "placements", None)) for n, p in model.named_parameters()
    }
    return result


def resumed(path: Path, opt_name: str, layout: dict, scratch: Path) -> dict[str, Any]:
    """2 steps, the model and the optimizer saved, both loaded into a new model, 1 step."""
    from transformers.distributed import load_optimizer_distributed, save_optimizer_distributed

    model = load(path, **layout)
    opt = make_optimizer(opt_name, model.named_parameters())
    train(model, opt, batches()[:SAVED_AFTER])
    model.save_pretrained(scratch / "model", distributed_checkpoint=True)
    save_optimizer_distributed(model, opt, str(scratch / "optimizer"))

    model = load(scratch / "model", **layout)
    opt = make_optimizer(opt_name, model.named_parameters())
    load_optimizer_distributed(model, opt, str(scratch / "optimizer"))
    steps_loaded = float(opt.param_groups[0]["step"])
    calls = train(model, opt, batches()[SAVED_AFTER:])
    result = finished(model, opt, calls)
    result["steps_loaded"] = steps_loaded
    return result


FSDP_TP = {"tp_size": 2, "fsdp_size": 2}
TP_AUTO = {"tp_plan": "auto"}
FSDP = {"fsdp_size": 4}


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4 * GLOBAL_BATCH

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def trainer_for(model, scratch: Path, **args: Any):
    """The HF Trainer naming TVLARS, without clipping or an LR schedule (docs/integrations.md)."""
    from transformers import Trainer, TrainingArguments

    arguments = TrainingArguments(
        output_dir=str(scratch / "trainer"),
        per_device_train_batch_size=1,
        max_steps=STEPS,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        **{"save_strategy": "no", "logging_strategy": "no", **args},
    )
    return Trainer(
        model=model,
        args=arguments,
        train_dataset=Tokens(),
        optimizer_cls_and_kwargs=OPTIMIZERS["TVLARS"],  # (TVLARS, the comparisons' settings)
    )


def trainer_runs(path: Path, scratch: Path) -> dict[str, Any]:
    """What transformers 5.24.0's Trainer does with such models on CPU: it trains an FSDP2 one
    with TVLARS; it refuses to checkpoint its optimizer, and a tp one (accelerate's
    ``ParallelismConfig`` wants a GPU's distributed type). Not compared with one process: the
    Trainer's sampler and token-count loss are its own."""
    out: dict[str, Any] = {}
    for case, layout, args in (
        ("tp", FSDP_TP, {}),
        ("checkpointing", FSDP, {"save_strategy": "steps"}),
    ):
        try:
            trainer_for(load(path, **layout), scratch, **args)
        except ValueError as exc:
            out[f"refused-{case}"] = str(exc)
    trainer = trainer_for(load(path, **FSDP), scratch)
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps ours
    out["class"] = type(optimizer).__name__
    out["steps"] = [float(g["step"]) for g in optimizer.param_groups]
    out["stats"] = optimizer.layer_stats().to_dict()
    return out


def world(rank: int, ws: int, path: Path, scratch: Path) -> dict[str, Any]:
    return {
        "TVLARS": run(path, "TVLARS", FSDP_TP),
        "LAMB": run(path, "LAMB", FSDP_TP),
        "naive-TVLARS": run(path, "TVLARS", FSDP_TP, skip_reduce=True),
        "resumed-TVLARS": resumed(path, "TVLARS", FSDP_TP, scratch),
        "tp_auto-TVLARS": run(path, "TVLARS", TP_AUTO),
        "naive-tp_auto-TVLARS": run(path, "TVLARS", TP_AUTO, skip_reduce=True),
        "trainer": trainer_runs(path, scratch),
    }


@pytest.fixture(scope="module")
def world4(checkpoint, tmp_path_factory) -> list[dict]:
    with pytest.MonkeyPatch.context() as env:
        # transformers puts its mesh on the accelerator it finds: keep the ranks on CPU/gloo
        env.setenv("CUDA_VISIBLE_DEVICES", "")
        return run_ranks(world, 4, checkpoint, tmp_path_factory.mktemp("resume"))


_REFERENCES: dict[str, dict] = {}


def reference(path: Path, opt_name: str) -> dict:
    if opt_name not in _REFERENCES:
        make = lambda: load(path)  # noqa: E731
        _REFERENCES[opt_name] = single_process(make, opt_name, batches(), lm_loss)
    return _REFERENCES[opt_name]


# ------------------------------------------------------------------------------ tests
def test_distributed_config_places_on_the_2d_mesh(world4):
    placements = world4[0]["TVLARS"]["placements"]
    strided = "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert placements["model.embed_tokens.weight"] == strided
    assert placements["model.layers.0.self_attn.o_proj.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert placements["model.norm.weight"] == "(Shard(dim=0),)"  # the fsdp dim alone


@pytest.mark.parametrize("opt_name", ["TVLARS", "LAMB"])
def test_distributed_config_matches_one_process(world4, checkpoint, opt_name):
    ref = reference(checkpoint, opt_name)
    for result in world4:
        assert_matches(result[opt_name], ref)


def test_distributed_config_without_the_reduction_misses(world4, checkpoint):
    ref = reference(checkpoint, "TVLARS")
    assert all(misses(result["naive-TVLARS"], ref) for result in world4)


def test_resumed_from_transformers_checkpoints_equals_the_uninterrupted_run(world4):
    for result in world4:
        run = result["resumed-TVLARS"]
        assert run["steps_loaded"] == SAVED_AFTER  # phi(t)'s counter came back
        torch.testing.assert_close(run["params"], result["TVLARS"]["params"], rtol=0, atol=0)
        assert (run["steps"], run["skipped"]) == (result["TVLARS"]["steps"], [0.0])


def test_tp_auto_embedding_has_a_replicate_gradient(world4):
    result = world4[0]["tp_auto-TVLARS"]
    assert result["placements"]["model.embed_tokens.weight"] == "(Shard(dim=0),)"
    assert result["grad_placements"]["model.embed_tokens.weight"] == "(Replicate(),)"


def test_tp_auto_matches_one_process(world4, checkpoint):
    ref = reference(checkpoint, "TVLARS")
    for result in world4:
        assert_matches(result["tp_auto-TVLARS"], ref)
        # one all-reduce per step over the tp group: slicing the embedding's gradient adds none
        calls = result["tp_auto-TVLARS"]["calls"]
        assert [[ranks for ranks, _ in step] for step in calls] == [[(0, 1, 2, 3)]] * STEPS


def test_tp_auto_without_the_reduction_misses(world4, checkpoint):
    ref = reference(checkpoint, "TVLARS")
    assert all(misses(result["naive-tp_auto-TVLARS"], ref) for result in world4)


# ------------------------------------------------------------------------------ the Trainer
def test_trainer_trains_an_fsdp2_model_with_tvlars(world4):
    """Every rank steps TVLARS 3 times (both of the Trainer's param groups) and reports the same
    true norms of each layer."""
    runs = [result["trainer"] for result in world4]
    for run in runs:
        assert run["class"] == "TVLARS" and run["steps"] == [float(STEPS)] * 2
        assert run["stats"].keys() == runs[0]["stats"].keys()
        for layer, row in run["stats"].items():
            assert row == pytest.approx(runs[0]["stats"][layer], rel=1e-6), layer


def test_trainer_refuses_what_docs_integrations_says(world4):
    """transformers 5.24.0; when a newer one accepts either, docs/integrations.md's Trainer
    paragraph changes with this test."""
    run = world4[0]["trainer"]
    assert (
        "Resuming is not supported for models sharded at load time" in run["refused-checkpointing"]
    )
    assert "ParallelismConfig is only compatible" in run["refused-tp"]
    assert "MULTI_CPU" in run["refused-tp"]
