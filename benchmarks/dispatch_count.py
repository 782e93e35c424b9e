"""Count the GPU work of one optimizer step on a machine without a GPU.

What it measures, per optimizer and set of parameter shapes, for one steady-state ``step()``:

- ``ops``: aten operators that touch a CUDA tensor and are neither views nor allocations. On a
  GPU each launches at least one kernel (or one copy); a ``_foreach_*`` op counts 1.
- ``launches``: the same, except that a ``_foreach_*`` op that CUDA would run on its per-tensor
  slow route counts one launch per tensor. ATen takes the multi-tensor fast route only when
  every tensor of every ``TensorList`` argument is on one device, strided, non-overlapping and
  dense, each list has one dtype shared with the first list, the tensors at each index share
  sizes and strides (a size-1 dimension's stride is free), the scalars do not promote the
  tensors' dtype, and a single 0-d CUDA ``Tensor`` scalar (``_foreach_mul_.Tensor``) has the
  tensors' dtype (``check_fast_path_restrictions`` in ``aten/src/ATen/native/ForeachUtils.h``
  and the CUDA foreach kernels). So ``_foreach_mul_(tensors, [one 0-d tensor per tensor])`` is
  one op but ``len(tensors)`` launches, while ``_foreach_mul_(tensors, a_0d_tensor)`` is one.
- ``bytes``: the summed sizes of those ops' CUDA operands and results: an upper bound on the
  step's memory traffic (an in-place op counts its tensor twice, read and written).
- ``host_reads``: reads of a CUDA value on the host (``.item()``, ``bool(t)``: aten's
  ``_local_scalar_dense``) and copies from a CUDA tensor to a CPU one; each waits for the GPU
  to drain its queue.
- ``h2d``: copies from a CPU tensor to a CUDA one (a Python number turned into a CUDA tensor
  every step, say): no sync, but a CUDA graph refuses them (pageable memory) or replays the
  value copied at capture time.

Method: parameters and gradients are ``FakeTensor``\\ s on device ``"cuda"`` (no GPU, no driver:
``FakeTensorMode(allow_non_fake_inputs=True)``); a ``TorchDispatchMode`` sees every aten op of
the step after ``warmup`` steps that created the optimizer's state. A host read of a fake
tensor has no value to return: the counter returns a stand-in (``True``, ``1``, ``1.0`` by
dtype) so that the step can go on, and counts the read.

    python benchmarks/dispatch_count.py                    # all shape sets
    python benchmarks/dispatch_count.py --shapes resnet50  # ResNet-50's 161 tensors

Limits:

- A count of operators, not a timing: it says how the step's cost grows with the number of
  tensors, not what a launch or a byte costs on a given GPU.
- On a real GPU a fast-route foreach op is itself several launches of one kernel when its list
  is long (``multi_tensor_apply`` packs 30-110 tensors, by the number of lists, and 320 chunks
  of 64K elements per launch), ``_foreach_norm`` adds a clean-up kernel, a ``cat``/``stack``
  of many inputs copies them in batches, and a large reduction may take two kernels.
  ``launches`` counts each of these as 1: it separates "constant in the number of tensors"
  from "one per tensor"; it is not an exact kernel count (``step_time.py --check-syncs
  --device cuda`` profiles that on a GPU).
- Compiled steps (our ``fused=True``) are not in the table: inductor does not run under this
  counter. Torch's fused optimizers count their ``_fused_*`` kernel as one op (fake mode has
  no fake kernel for ``_fused_sgd_``: the counter skips running it, which changes nothing on
  tensors without values); anything else that fake mode cannot run shows as n/a.
- The count is only as faithful as the code path: code that branches on
  ``torch.cuda.is_available()`` or on values read from the device would take another path
  on a real GPU.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import tvlars_scale

MakeOptimizer = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

#: Non-view aten ops that launch no kernel: allocations and metadata changes.
NO_KERNEL = frozenset(
    {
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "lift_fresh",
        "detach",
        "alias",
        "_unsafe_view",
        "resize_",
        "set_",
        "record_stream",
    }
)
#: Ops that return a tensor's value to Python.
HOST_READS = frozenset({"_local_scalar_dense", "item"})
#: Foreach ops whose result is floating point for integral inputs: ATen sends integral lists
#: to the slow route (``does_op_promote_integer_inputs_to_float``).
_FLOAT_RESULT = frozenset(
    {
        *("div", "reciprocal", "sqrt", "exp", "expm1", "log", "log10", "log1p", "log2"),
        *("sigmoid", "sin", "sinh", "cos", "cosh", "tan", "tanh", "asin", "acos", "atan"),
        *("erf", "erfc", "lgamma", "lerp", "addcdiv", "pow"),
    }
)


@dataclass
class Counts:
    """What one ``step()`` would do on a GPU (see the module docstring for each field)."""

    ops: collections.Counter[str] = field(default_factory=collections.Counter)
    launches: int = 0
    bytes: int = 0
    host_reads: int = 0
    h2d: int = 0
    #: Foreach ops that took the per-tensor slow route, with the launches they made.
    slow: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def num_ops(self) -> int:
        return sum(self.ops.values())


class CountingMode(TorchDispatchMode):
    """Counts the aten ops that run under it into ``self.counts`` (see ``Counts``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "aten":
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.counts.host_reads += _is_cuda(args[0])
            try:
                return func(*args, **kwargs)
            except DataDependentOutputException:  # a fake tensor has no value to read
                return _stand_in(args[0].dtype)
        try:
            out = func(*args, **kwargs)
        except RuntimeError:
            # Fake mode has no fake kernel for some of torch's fused optimizer ops
            # (``_fused_sgd_``) and tries the real one. They update their arguments in place
            # and return nothing: on fake tensors, which hold no values, skipping them is
            # the same as running them.
            if not (name.startswith("_fused_") and not func._schema.returns):
                raise
            out = None
        if func.is_view or name in NO_KERNEL:
            return out
        operands = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if not any(_is_cuda(t) for t in operands):
            return out
        if name in ("_to_copy", "copy_", "_copy_from"):
            src, dst = (args[1], args[0]) if name == "copy_" else (args[0], out)
            self.counts.host_reads += _is_cuda(src) and dst.device.type == "cpu"
            self.counts.h2d += src.device.type == "cpu" and _is_cuda(dst)
        launches, slow = _launches(func, args, kwargs)
        self.counts.ops[name] += 1
        self.counts.launches += launches
        if slow:
            self.counts.slow[name] += launches
        self.counts.bytes += sum(t.numel() * t.element_size() for t in operands if _is_cuda(t))
        return out


def _is_cuda(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cuda"


def _stand_in(dtype: torch.dtype) -> bool | int | float:
    if dtype == torch.bool:
        return True
    return 1.0 if dtype.is_floating_point or dtype.is_complex else 1


def _bound(func, args, kwargs) -> Iterator[tuple[str, Any]]:
    """(name, value) of each argument the call passed."""
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args):
            yield arg.name, args[i]
        elif arg.name in kwargs:
            yield arg.name, kwargs[arg.name]


def _launches(func, args, kwargs) -> tuple[int, bool]:
    """(launches, slow route?) of one op: a foreach op on CUDA's per-tensor slow route makes
    one launch per tensor; everything else counts 1 (see the module docstring's limits)."""
    name = func.overloadpacket.__name__
    if not name.startswith("_foreach_"):
        return 1, False
    lists, scalars, tensor_scalars = [], [], []
    bound = dict(_bound(func, args, kwargs))
    for arg_name, value in bound.items():
        if isinstance(value, torch.Tensor):
            tensor_scalars.append(value)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            lists.append(list(value))
        elif isinstance(value, (list, tuple)):
            scalars.extend(value)  # checked against the first tensor only: one dtype anyway
        elif isinstance(value, (bool, int, float, complex)) and arg_name != "ord":
            scalars.append(value)
    if not lists or not lists[0]:
        return 1, False
    fast = _fast_route(lists, skip_cross_list_dtype=name == "_foreach_copy_")
    first = lists[0][0]
    fast = fast and all(torch.result_type(first, s) == first.dtype for s in scalars)
    if not first.dtype.is_floating_point and not first.dtype.is_complex:
        fast = fast and name.removeprefix("_foreach_").rstrip("_") not in _FLOAT_RESULT
    for t in tensor_scalars:  # a CPU tensor is read as a number first: fast, no sync
        fast = fast and (t.device.type == "cpu" or (t.ndim == 0 and t.dtype == first.dtype))
    if name == "_foreach_norm":
        fast = fast and float(bound.get("ord", 2)) in (1.0, 2.0, math.inf)
    return (1, False) if fast else (len(lists[0]), True)


def _fast_route(lists: list[list[torch.Tensor]], skip_cross_list_dtype: bool = False) -> bool:
    """ATen's ``check_fast_path_restrictions`` on the tensor lists of one foreach call."""
    first = lists[0][0]
    for tensors in lists:
        list_dtype = tensors[0].dtype if tensors else None
        for t in tensors:
            if (
                t.device != first.device
                or t.layout != torch.strided
                or not _non_overlapping_and_dense(t)
                or t.dtype != list_dtype
                or (not skip_cross_list_dtype and t.dtype != first.dtype)
            ):
                return False
    for tensors in lists[1:]:
        for a, b in zip(lists[0], tensors, strict=True):
            if a.shape != b.shape or any(
                n != 1 and sa != sb
                for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True)
            ):
                return False
    return True


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """Whether some permutation of ``t``'s dimensions makes it contiguous (ATen's
    ``is_non_overlapping_and_dense``)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def count_step(
    make_optimizer: MakeOptimizer, shapes: Sequence[Sequence[int]], *, warmup: int = 2
) -> Counts:
    """Counts of the ``warmup + 1``-th ``step()`` of ``make_optimizer(params)`` on fake CUDA
    parameters of ``shapes`` with gradients (the warm-up steps create the state)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = make_optimizer(params)
        with CountingMode():  # stand-ins for host reads, should the warm-up steps make any
            for _ in range(warmup):
                optimizer.step()
        with CountingMode() as mode:
            optimizer.step()
    return mode.counts


# ------------------------------------------------------------------ shape sets
def _torchvision_shapes(name: str) -> list[torch.Size]:
    import torchvision  # optional: only these shape sets need it

    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        model = getattr(torchvision.models, name)()
    return [p.shape for p in model.parameters()]


def list1000_shapes() -> list[torch.Size]:
    """A 1,000-tensor "transformer list": (256, 256) matrices alternating with (256,) vectors
    (biases and norm weights), 33M elements: many tensors, each small."""
    return [torch.Size((256, 256) if i % 2 == 0 else (256,)) for i in range(1000)]


def tiny1000_shapes() -> list[torch.Size]:
    """1,000 tiny tensors, (8, 8) matrices alternating with (8,) vectors: a step's time is then
    the host's time to issue it (Python and dispatch), which is what a GPU waits for when its
    kernels are short."""
    return [torch.Size((8, 8) if i % 2 == 0 else (8,)) for i in range(1000)]


SHAPE_SETS: dict[str, Callable[[], list[torch.Size]]] = {
    "resnet50": lambda: _torchvision_shapes("resnet50"),
    "vit_b_16": lambda: _torchvision_shapes("vit_b_16"),
    "list1000": list1000_shapes,
    "tiny1000": tiny1000_shapes,
}


def shapes(name: str) -> list[torch.Size]:
    """The parameter shapes of a set of ``SHAPE_SETS`` (the torchvision ones need
    torchvision)."""
    return SHAPE_SETS[name]()


# ------------------------------------------------------------------ optimizers
def device_decision(cls: type[torch.optim.Optimizer], params, **kwargs: Any):
    """``cls(params, **kwargs)`` on the path accelerators take: the step's skip decision stays
    a device tensor (no host read). Passes ``decide_on_host=False`` where the constructor
    takes it, else sets the attribute (the core before the keyword existed)."""
    if "decide_on_host" in inspect.signature(cls).parameters:
        return cls(params, decide_on_host=False, **kwargs)
    optimizer = cls(params, **kwargs)
    optimizer.decide_on_host = False
    return optimizer


OPTIMIZERS: dict[str, MakeOptimizer] = {
    "torch SGD(foreach)": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True
    ),
    "torch AdamW(foreach)": lambda ps: torch.optim.AdamW(
        ps, lr=1e-3, weight_decay=1e-2, foreach=True
    ),
    "torch SGD(fused)": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True
    ),
    "torch AdamW(fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True),
    "TVLARS": lambda ps: device_decision(tvlars_scale.TVLARS, ps, lr=1.0, total_steps=1000),
    "LARS": lambda ps: device_decision(tvlars_scale.LARS, ps, lr=1.0),
    "LAMB": lambda ps: device_decision(tvlars_scale.LAMB, ps, lr=1e-3),
}


# ------------------------------------------------------------------ CLI
def _cell(counts: Counts | str) -> str:
    if isinstance(counts, str):
        return "n/a"
    return (
        f"{counts.num_ops} / {counts.launches} / {counts.bytes / 2**20:.1f} / {counts.host_reads}"
    )


def _details(counts: Counts | str) -> str:
    if isinstance(counts, str):
        return counts
    most = ", ".join(f"{op} {n}" for op, n in counts.ops.most_common(4))
    slow = ", ".join(f"{op} {n}" for op, n in counts.slow.most_common())
    return f"{most}" + (f"; slow route: {slow}" if slow else "") + f"; h2d copies {counts.h2d}"


def _error(exc: Exception) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"n/a ({type(exc).__name__}: {first_line[:60]})"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["resnet50", "vit_b_16", "list1000"],
        choices=list(SHAPE_SETS),
    )
    parser.add_argument(
        "--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS)
    )
    parser.add_argument("--warmup", type=int, default=2, help="steps before the counted one")
    args = parser.parse_args(argv)

    sets = {name: shapes(name) for name in args.shapes}
    results: dict[str, dict[str, Counts | str]] = {}
    for opt_name in args.optimizers:
        results[opt_name] = {}
        for set_name, set_shapes in sets.items():
            try:
                counts = count_step(OPTIMIZERS[opt_name], set_shapes, warmup=args.warmup)
            except Exception as exc:  # torch's fused kernels need a real device
                counts = _error(exc)
            results[opt_name][set_name] = counts

    print(
        f"One step after {args.warmup} warm-up steps on fake CUDA tensors, torch "
        f"{torch.__version__}. Each cell: ops / launches (a slow-route foreach op counts one "
        "per tensor) / operand MB / host reads."
    )
    print(
        "| optimizer | "
        + " | ".join(f"{name} ({len(s)} tensors)" for name, s in sets.items())
        + " |"
    )
    print("|---|" + "---:|" * len(sets))
    for opt_name, row in results.items():
        print(f"| {opt_name} | " + " | ".join(_cell(row[s]) for s in sets) + " |")
    print("\nMost common ops per step:")
    for opt_name, row in results.items():
        for set_name in sets:
            print(f"  {opt_name} [{set_name}]: {_details(row[set_name])}")


if __name__ == "__main__":
    sys.exit(main())
