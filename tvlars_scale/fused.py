"""The opt-in fused step (``fused=True``): the functional math, compiled with ``torch.compile``.

Eagerly, every foreach operation of a step is one pass over parameter-sized tensors, so the step
costs what its passes cost (the step is memory-bound). ``fused=True`` compiles the two passes of
the LARS rule with inductor (C++/OpenMP on CPU, Triton on CUDA):

- the local pass (``functional.lars_piece_sums``): the partial sums of squares of a piece, in one
  read of w and g instead of three dot products;
- the update pass (``functional.lars_apply_``) as accelerators run it, masked by a decision kept
  on the device: one read of g, w and the momentum and one write of the momentum and w, with no
  host sync. A decision read on the host (CPU) needs no masking, and there torch's fused SGD
  kernel already makes the update one pass, in either mode.

Between them the optimizer core runs the sharded-norm reduction eagerly (``reduction``).

**Bounded graphs.** A graph that unrolls every parameter tensor grows with the model, and so
does its compile time (minutes for a ResNet-50). Here the adapted pieces (weights: nearly all
the elements) are cut into buckets of ``BUCKET`` pieces, each piece passed as a 1-D view whose
length is symbolic (``dynamic=True``, duck shaping off, so that no two lengths are tied), and
every bucket runs the same graph; the last bucket is filled up with scratch pieces. A graph is
specialised only on what is fixed for a model (the dtypes, and the options of the rule), so an
optimizer compiles one graph of ``BUCKET`` pieces per pass, whatever the model. Pieces a graph
does not take run the eager function: the excluded ones (biases, norm gains: few elements,
cheaper eagerly than in a graph of their own), those whose tensors are not laid out alike in one
block of memory each (contiguous and channels-last ones are), one-element ones (torch
specialises a length of 1), and, in the local pass, those of at most ``LARGE`` elements
(inductor sums longer ones differently and guards on which a length needs).

Compiled graphs are reused, never rebuilt per step: every scalar that changes during training is
a tensor (the step counter and phi already are; the learning rate, momentum and weight decay,
which schedules change, are passed as 0-d tensors refilled each step). One compiled copy of
each function serves every group of an optimizer (the recompile limit counts per code object,
so each optimizer has its own copy). If compilation fails (no C++ compiler, an inductor error,
the recompile limit), the optimizer warns once and runs the eager step from then on.

LAMB compiles nothing: its moments and direction are one pass of torch's fused Adam kernel in
either mode (``functional.lamb_directions_``).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch._dynamo.config as dynamo_config
import torch.fx.experimental._config as fx_config
from torch import Tensor

from .functional import one_dense_layout
from .functional.masked import scale_pieces_

__all__ = ["BUCKET", "LARGE", "FusedStep"]

#: Pieces per compiled call: compile time grows with it, call overhead shrinks.
BUCKET = 4
#: Inductor sums more than 4096 elements with a different (cascaded) reduction, and guards on
#: which one a length needs; the local pass compiles only pieces above it.
LARGE = 4096


def _compile_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo import exc  # imported on failure only

    return (exc.TorchDynamoException, exc.FailOnRecompileLimitHit)


def _own_code(fn: Callable) -> Callable:
    """A copy of ``fn`` with its own code object.

    Dynamo keeps compiled graphs, and counts its recompile limit, per code object. Without a copy
    every optimizer in the process would share one cache of the same function.
    """
    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    return copy


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "inner_exception", None) or exc  # BackendCompilerFailed wraps the cause
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0] if lines else ''}"[:200]


def _flat(t: Tensor) -> Tensor:
    """A 1-D alias of a dense tensor in memory order (``functional.one_dense_layout``) that is
    not a view (dynamo would also guard on the shape of a view's base), sharing its storage and
    version counter."""
    return t.as_strided((t.numel(),), (1,)).detach()


@dataclass
class _Buckets:
    """How one pass cuts a group's pieces: the piece in each slot of each bucket (-1: a scratch
    piece), and the pieces left to the eager function."""

    buckets: list[list[int]]
    rest: list[int]
    #: Per bucket, the index of each slot's piece (0 for scratch), on the pieces' device.
    slot_index: list[Tensor]
    #: The pieces in the order a pass produces their sums (held ones, then the rest), on the
    #: pieces' device: built once, as a per-step copy from the host would sync an accelerator.
    order: Tensor


def _bucketize(
    lists: Sequence[Sequence[Tensor]], n_adapted: int, min_numel: int, size: int
) -> _Buckets:
    kinds: dict[tuple, list[int]] = {}
    rest = []
    for i, piece in enumerate(zip(*lists, strict=True)):
        # Excluded pieces (biases, norm gains) are few elements: the eager function is cheaper
        # than a graph of their own, and every bucket has n_adapted == size.
        if i < n_adapted and piece[0].numel() >= min_numel and one_dense_layout(piece):
            kinds.setdefault(tuple(t.dtype for t in piece), []).append(i)
        else:
            rest.append(i)
    buckets = []
    for index in kinds.values():
        # Largest first: pieces of a bucket are alike, and the first bucket, which the graph is
        # traced with, has each slot's size hint large, so that inductor parallelises every
        # slot's loop (a length traced small stays on one thread).
        index.sort(key=lambda i: -lists[0][i].numel())
        for start in range(0, len(index), size):
            chunk = index[start : start + size]
            buckets.append(chunk + [-1] * (size - len(chunk)))
    device = lists[0][0].device
    slot_index = [torch.tensor([max(i, 0) for i in b], device=device) for b in buckets]
    held = [i for b in buckets for i in b if i >= 0]
    return _Buckets(buckets, rest, slot_index, torch.tensor(held + rest, device=device))


class FusedStep:
    """Compiled versions of the step functions of one optimizer, run bucket by bucket."""

    def __init__(self, owner: str, bucket: int | None = None) -> None:
        self.owner = owner
        self.bucket = bucket or BUCKET
        #: Set after a failed compilation: every later call runs the eager function.
        self.disabled = False
        self._compiled: dict[Callable, Callable] = {}
        self._scratch: dict[tuple, list[Tensor]] = {}
        self._scalars: dict[tuple[int, str], Tensor] = {}

    def clear(self) -> None:
        """Forget per-group scalars (param groups were replaced)."""
        self._scalars.clear()

    # ------------------------------------------------------------------ passes
    def piece_sums(
        self, fn: Callable, cache: dict, lists: list[list[Tensor]], n_adapted: int, *args: Any
    ) -> Tensor:
        """``fn(*lists, n_adapted, *args)``: a (rows, pieces) tensor of per-piece sums."""
        done, parts, leftover, order = self._run(
            fn, cache, "sums", lists, n_adapted, None, args, {}
        )
        if not done:
            return fn(*lists, n_adapted, *args)
        if leftover:
            parts.append(fn(*_pick(lists, leftover), _adapted(leftover, n_adapted), *args))
        held = torch.cat(parts, dim=1)
        if order is None:  # a compilation failed midway (once): the pieces came in another order
            order = torch.tensor(done + leftover, device=held.device)
        return torch.empty_like(held).index_copy_(1, order, held)

    def apply_(
        self,
        fn: Callable,
        cache: dict,
        lists: list[list[Tensor]],
        n_adapted: int,
        piece_scales: list[Tensor],
        **kwargs: Any,
    ) -> None:
        """``fn(*lists, n_adapted, piece_scales, **kwargs)``: an in-place update."""
        scales = torch.stack(piece_scales) if piece_scales else None
        _, _, leftover, _ = self._run(fn, cache, "apply", lists, n_adapted, scales, (), kwargs)
        if leftover:
            scales_left = [piece_scales[i] for i in leftover]
            fn(*_pick(lists, leftover), _adapted(leftover, n_adapted), scales_left, **kwargs)

    # ------------------------------------------------------------------ machinery
    def _run(
        self,
        fn: Callable,
        cache: dict,
        name: str,
        lists: list[list[Tensor]],
        n_adapted: int,
        scales: Tensor | None,
        args: tuple,
        kwargs: dict,
    ) -> tuple[list[int], list[Tensor], list[int], Tensor | None]:
        """Run the buckets of a pass through the compiled ``fn``. Returns the pieces done, the
        sums of each bucket (rows, its pieces) when ``fn`` returns them, the pieces left to the
        eager function (adapted first), and the order of done + left as a device tensor (None
        if it is not the planned one)."""
        everything = list(range(len(lists[0])))
        # A step the caller compiles takes the eager functions into its own graphs.
        if self.disabled or not everything or torch.compiler.is_compiling():
            return [], [], everything, None
        # a sum over more than LARGE elements compiles differently: only those share a graph
        min_numel = LARGE + 1 if name == "sums" else 2
        signature = (name, n_adapted, *map(one_dense_layout, zip(*lists, strict=True)))
        cut = cache.get(signature)
        if cut is None:
            cut = cache[signature] = _bucketize(lists, n_adapted, min_numel, self.bucket)
        try:
            compiled = self._compiled_fn(fn)
        except RuntimeError as exc:  # e.g. dynamo does not support this Python
            self._give_up(exc)
            return [], [], everything, None
        done: list[int] = []
        results = []
        # Lengths are symbolic; without duck shaping, equal lengths are not tied together
        # (which would make the next bucket, with other equalities, compile again). Python
        # numbers are constants of a graph: torch 2.9 would make a number that changes between
        # calls a tensor input and read it back on the host to branch on it. The numbers that
        # a schedule may change (lr, momentum, weight decay, phi, step) are tensors.
        with fx_config.patch(use_duck_shape=False), dynamo_config.patch(specialize_float=True):
            for number, slots in enumerate(cut.buckets):
                call = [
                    [
                        _flat(x[i]) if i >= 0 else self._scratch_piece(k, s, x[slots[0]])
                        for s, i in enumerate(slots)
                    ]
                    for k, x in enumerate(lists)
                ]
                if scales is not None:
                    call.append(list(scales.index_select(0, cut.slot_index[number]).unbind()))
                try:
                    out = compiled(
                        *call[: len(lists)],
                        self.bucket,
                        *call[len(lists) :],
                        *args,
                        **kwargs,
                        traced=True,  # the graph-friendly forms (the eager rest: the default)
                    )
                except Exception as exc:
                    if not isinstance(exc, _compile_errors()):
                        raise
                    # Raised while tracing or compiling this bucket, before its graph ran: its
                    # pieces and the later ones are untouched and go to the eager function.
                    self._give_up(exc)
                    later = [i for s in cut.buckets[number:] for i in s if i >= 0]
                    return done, results, sorted(later + cut.rest), None
                held = [j for j, i in enumerate(slots) if i >= 0]
                done += [slots[j] for j in held]
                if out is not None:
                    results.append(out[:, held])
        return done, results, cut.rest, cut.order

    def _scratch_piece(self, kind: int, slot: int, like: Tensor) -> Tensor:
        """A distinct scratch piece per list and slot (dynamo guards on an input that is passed
        twice), long enough for any graph."""
        pieces = self._scratch.setdefault((kind, like.dtype, like.device), [])
        while len(pieces) <= slot:
            pieces.append(torch.zeros(LARGE + 1, dtype=like.dtype, device=like.device))
        return pieces[slot]

    def scale_(self, pieces: list[Tensor], scales: Tensor) -> None:
        """``functional.masked.scale_pieces_`` (``pieces[i] *= scales[i]``) as one compiled
        graph over every piece: eagerly CUDA runs it as a kernel per piece, compiled it is a
        few horizontally fused kernels. The graph is specialised on the pieces' shapes (one per
        plan); a failed compilation runs the eager function from then on."""
        if not self.disabled:
            try:
                return self._compiled_fn(scale_pieces_, dynamic=False)(pieces, scales)
            except Exception as exc:
                if not isinstance(exc, _compile_errors()):
                    raise
                self._give_up(exc)  # raised before the graph ran: nothing was scaled yet
        scale_pieces_(pieces, scales)

    def _compiled_fn(self, fn: Callable, dynamic: bool = True) -> Callable:
        compiled = self._compiled.get(fn)
        if compiled is None:
            compiled = self._compiled[fn] = torch.compile(
                _own_code(fn),
                backend="inductor",
                fullgraph=True,
                dynamic=dynamic,
                options={"split_reductions": False},
            )
        return compiled

    def scalar(self, group: dict[str, Any], name: str, device: torch.device) -> Tensor:
        """The group's hyperparameter ``name`` as a 0-d fp32 tensor, for the numbers schedules
        change every step: ``lr``, ``momentum`` (``OneCycleLR`` and ``CyclicLR`` cycle it by
        default) and ``weight_decay`` (DINO-style schedules). Dynamo specialises a Python float
        (``specialize_float``): as a number, each new value would compile the graphs again,
        until the recompile limit ends the fused step. Refilled in place, which needs no
        host-to-device copy."""
        value = group[name]
        if isinstance(value, Tensor):
            return value.to(device=device, dtype=torch.float32)
        key = (id(group), name)
        buffer = self._scalars.get(key)
        if buffer is None or buffer.device != device:
            buffer = self._scalars[key] = torch.zeros((), dtype=torch.float32, device=device)
        return buffer.fill_(value)

    def _give_up(self, exc: BaseException) -> None:
        if not self.disabled:
            self.disabled = True
            warnings.warn(
                f"{self.owner}(fused=True): torch.compile failed ({_reason(exc)}); "
                "using the eager step.",
                RuntimeWarning,
                stacklevel=8,  # the caller of step(), through the pass and the optimizer
            )


def _pick(lists: list[list[Tensor]], index: list[int]) -> list[list[Tensor]]:
    return [[x[i] for i in index] for x in lists]


def _adapted(index: list[int], n_adapted: int) -> int:
    return sum(i < n_adapted for i in index)
