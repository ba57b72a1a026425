"""Counting what the denoising loop does: aten operations per step, and the ones that read a device value on the host.

On a GPU every operation is a kernel launch or at least a trip through the dispatcher, and an operation that reads a
value back (`.item()`, `bool(tensor)`, `.nonzero()`, a device-to-host copy) stalls the queue of launches until the
device catches up. Both can be counted on the CPU, where they are the same calls:

- `ops_per_step(run)`: aten operations per denoising step, from the torch profiler (every dispatched op, nested ones
  included), as the difference of a run of `steps` and one of `steps // 2` steps, so set-up, text encoding and decoding
  cancel. `view_ops` separates the operations that only make views (no kernel on any device).
- `LoopWatch`: a controller that opens a window at the end of the first step and closes it at the end of the last, and a
  dispatch mode that counts, inside the window, the operations that read device values on the host (`HOST_READS`) and
  copies between devices.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .routing import AttentionController

# aten operations that read a device tensor's value on the host (a device-to-host synchronisation on a GPU)
HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero", "aten::equal",
              "aten::allclose", "aten::masked_select", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
              "aten::repeat_interleave")

# operations that only make views or read metadata: no kernel runs for them on any device
VIEW_OPS = frozenset((
    "aten::as_strided", "aten::slice", "aten::select", "aten::view", "aten::_unsafe_view", "aten::_reshape_alias",
    "aten::reshape", "aten::expand", "aten::expand_as", "aten::transpose", "aten::t", "aten::permute",
    "aten::unsqueeze", "aten::squeeze", "aten::narrow", "aten::alias", "aten::detach", "aten::resolve_conj",
    "aten::resolve_neg", "aten::flatten", "aten::unflatten", "aten::split", "aten::split_with_sizes", "aten::chunk",
    "aten::unbind", "aten::view_as", "aten::lift_fresh", "aten::result_type", "aten::contiguous", "aten::to",
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::size", "aten::stride", "aten::dim",
    "aten::is_contiguous", "aten::numel",
))


def aten_counts(run: Callable[[], object]) -> Counter:
    """Every aten operation `run()` dispatches, by name (the profiler's count, nested ones included); with CUDA, also
    the kernel launches the host issued, under the key "launches"."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    counts = Counter({e.key: e.count for e in events if e.key.startswith("aten::")})
    if cuda:
        counts["launches"] = sum(e.count for e in events if "LaunchKernel" in e.key)
    return counts


def ops_per_step(run: Callable[[int], object], steps: int = 4) -> Counter:
    """aten operations per denoising step: (ops of run(steps) - ops of run(steps // 2)) / (steps - steps // 2)."""
    long, short = aten_counts(lambda: run(steps)), aten_counts(lambda: run(steps // 2))
    span = steps - steps // 2
    return Counter({k: (long[k] - short[k]) / span for k in set(long) | set(short) if long[k] != short[k]})


def view_ops(counts: Counter) -> float:
    """How many of the counted operations only make views or read metadata (no kernel)."""
    return sum(v for k, v in counts.items() if k in VIEW_OPS)


def summary(counts: Counter) -> dict:
    """{"all": aten ops, "kernel": aten ops that are not views or metadata, "launches": CUDA kernel launches (only
    where CUDA ran)} of a per-step count."""
    ops = {k: v for k, v in counts.items() if k.startswith("aten::")}
    out = {"all": sum(ops.values()), "kernel": sum(ops.values()) - view_ops(counts)}
    if "launches" in counts:
        out["launches"] = counts["launches"]
    return out


class _Counting(TorchDispatchMode):
    def __init__(self, watch: LoopWatch):
        super().__init__()
        self.watch = watch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watch.active:
            name = f"aten::{func._opname}"
            if name in HOST_READS:
                self.watch.reads[name] += 1
            devices = {a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
            if func._opname in ("_to_copy", "copy_", "to") and len(devices) > 1:
                self.watch.reads["copy between devices"] += 1
            elif func._opname in ("_to_copy",) and kwargs.get("device") is not None and \
                    any(torch.device(kwargs["device"]) != d for d in devices):
                self.watch.reads["copy between devices"] += 1
        return func(*args, **kwargs)


class LoopWatch(AttentionController):
    """Counts host reads between the end of the first denoising step and the end of the last.

    Add it last to the controllers of a generation (it changes nothing) and run the generation inside `with watch:`.
    `reads` counts each kind of host read (`HOST_READS`, "copy between devices") seen in that window.
    """

    def __init__(self, steps: int):
        self.steps = steps
        self.active = False
        self.reads: Counter = Counter()
        self._mode = _Counting(self)

    def step_end(self, step, timestep, latents):
        self.active = step < self.steps - 1  # opens after the first step, closes after the last
        return None

    def __enter__(self) -> LoopWatch:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.active = False
        self._mode.__exit__(*exc)
