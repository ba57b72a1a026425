"""The numbers a user passes, checked in one place per kind: seeds, whole counts, finite numbers, factors.

Each check returns the value (as an int or float) or raises `error` (`InputError` unless the caller names another
`P2PError`) with one sentence naming the setting, what was expected and what was given. The option classes
(`GenerationOptions`, `EditOptions`, `FlowEditOptions`, `InversionOptions`) and the command lines' argument types
use these bounds, so each is stated once: a seed beyond what torch's generator takes, or a factor beyond what the
model's dtype holds, is refused before any work instead of overflowing inside torch.
"""

from __future__ import annotations

import math
import os

from .errors import InputError

FACTOR_MAX = 3.4028234663852886e38  # float32's largest finite value (torch.finfo(torch.float32).max)
SEED_MAX = 2**63 - 1
MAX_STEPS = 1000  # denoising steps: the training timesteps (num_train_timesteps) of every supported family's
# scheduler; a DDIM-family sampler cannot take more steps than it has timesteps, and beyond it a flow sampler only
# spends time (and a mistyped 100000000 would allocate until the machine runs out of memory)


def cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_threads(value: int, name: str = "--threads", error=InputError) -> int:
    """Torch threads: 0 (torch's own choice) up to the cores this machine gives the process; more only oversubscribe
    (and a huge number crashes torch's thread pool)."""
    return check_whole(value, f"{name} (0: torch's default; at most this machine's {cores()} cores)", 0, cores(),
                       error)


def check_processes(processes: int, threads: int = 0, gpus: int = 0, error=InputError) -> int:
    """Processes of a parallel sweep: one per GPU where there are GPUs, else at most one per core, and with
    --threads N at most cores / N of them (each process's threads on cores of its own)."""
    if gpus:
        limit, why = gpus, f"one per GPU: this machine has {gpus}"
    else:
        limit = max(1, cores() // max(threads, 1))
        why = f"this machine has {cores()} cores" + (f", {threads} threads each" if threads else "")
    if isinstance(processes, bool) or not isinstance(processes, int) or not 1 <= processes <= limit:
        raise error(f"--processes must be from 1 to {limit} ({why}), got {processes!r}")
    return processes  # torch.Generator.manual_seed takes a signed 64-bit integer ("Overflow when unpacking long long")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_whole(value, name: str, low: int = 0, high: int | None = None, error=InputError) -> int:
    """A whole number from low to high (no bound above when high is None)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f">= {low}"
        raise error(f"{name} must be a whole number {span}, got {value!r}")
    return value


def check_seed(value, name: str = "seed", error=InputError) -> int:
    """A seed torch's generators take: a whole number from 0 to 2**63 - 1."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise error(f"{name} must be a whole number from 0 to 2**63 - 1, got {value!r}")
    return value


def check_finite(value, name: str, low: float | None = None, high: float | None = None, open_low: bool = False,
                 open_high: bool = False, error=InputError) -> float:
    """A finite number within [low, high] (bounds left out where None, excluded where open)."""
    bad = not _number(value) or not math.isfinite(value)
    if not bad:
        bad = (low is not None and (value <= low if open_low else value < low)) or (
            high is not None and (value >= high if open_high else value > high))
    if bad:
        lo = "" if low is None else f"{'>' if open_low else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if open_high else '<='} {high:g}"
        span = " and ".join(b for b in (lo, hi) if b)
        raise error(f"{name} must be a finite number{' ' + span if span else ''}, got {value!r}")
    return float(value)


def check_factor(value, name: str, dtype=None, error=InputError) -> float:
    """A multiplier of attention (a re-weight): finite, and within what the model's dtype holds (float32 when not
    known), so it cannot overflow where it is applied."""
    import torch

    dtype = dtype or torch.float32
    check_finite(value, name, error=error)
    largest = torch.finfo(dtype).max
    if abs(value) > largest:
        kind = str(dtype).removeprefix("torch.")
        raise error(f"{name} must be within +-{largest:.4g}, the range of the model's {kind}, got {value!r}")
    return float(value)


PROCESS_OVERHEAD = 600 * 2**20  # bytes a process takes before its weights (torch, diffusers and transformers imported;
# measured about 0.5 GB resident on this machine's CPU build)


def available_memory() -> int | None:
    """Bytes of memory the machine can still give (Linux's MemAvailable), or None where it cannot tell."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(processes: int, folder, error=InputError) -> None:
    """Refuses processes that would obviously not fit in memory: each loads the model's weights (their files' size,
    in the precision they are stored in) besides its own overhead; only the CPU's memory is estimated (a GPU's
    processes each have their own card)."""
    from pathlib import Path

    weights = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.suffix in (".safetensors", ".bin"))
    need, free = processes * (weights + PROCESS_OVERHEAD), available_memory()
    if free is not None and need > free:
        raise error(f"{processes} processes would each load {weights / 2**30:.1f} GiB of weights (and about "
                    f"{PROCESS_OVERHEAD / 2**30:.1f} GiB of their own): about {need / 2**30:.1f} GiB, but this machine "
                    f"has {free / 2**30:.1f} GiB free; run fewer processes")
