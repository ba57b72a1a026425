"""Rectified-flow inversion for flow-matching pipelines (SD3 / SD3.5, the bundled `shapes-flow`, Flux.1, Flux.2
[klein], Qwen-Image, Z-Image).

A flow-matching model predicts the velocity v = noise - image of the straight path x_s = (1 - s) image + s noise, and
sampling integrates dx/ds = v from s = 1 (noise) down to s = 0. Inversion integrates the same ODE upwards, from the
image's latent at s = 0 to the noise at s = 1, on the grid of noise levels that sampling will walk back down.

- `euler`: x_{k} = x_{k+1} + (s_k - s_{k+1}) v(x_{k+1}, s_{k+1}) upwards, sampled back with the pipeline's own Euler
  steps. First order: each direction's error is O(step), and they do not cancel. N steps: N model calls.
- `fireflow` (Deng et al. 2024, "FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing"): the midpoint
  method, whose midpoint is reached with the velocity from the previous step's midpoint instead of a new model call.
  Second order at one model call per step (N steps: N + 1 calls, the first at the start point), in both directions;
  sampling back uses `FireFlowScheduler`, the same solver as a diffusers scheduler.
- `rf-solver` (Wang et al. 2024, "Taming Rectified Flow for Inversion and Editing", RF-Solver-2): the second-order
  Taylor step with the velocity's derivative from a finite difference over half the step, x + h v + h^2 / 2 * (v_mid
  - v) / (h / 2) with v_mid at x + h / 2 v: two model calls a step (N steps: 2N calls), both directions through the
  same midpoints; sampled back with `RFSolverScheduler`.

Both directions walk the same grid with the same guidance, the pipeline's own (`velocity`, `set_flow_timesteps`:
the family's real-image side, `families/latents.py`, knows its velocity call, noise levels and shift), so that the
round trip differs only by the solvers' errors. Latents are inverted in the layout the pipeline's loop holds them in
(Flux's packed token sequence, SD3's image-shaped latents).
FireFlow evaluates the velocity at the same midpoints both ways; Euler evaluates at each step's start, which is the
step's other end going the other way (why its errors add up rather than cancel).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm import tqdm

FLOW_METHODS = ("fireflow", "euler", "rf-solver")
# Guidance of flow inversions (and of sampling and edits from them) unless asked otherwise. Measured on shapes-flow
# (BENCHMARKS.md): at 7.5 the guided ODE integrated backwards does not come back (FireFlow and Euler alike), at 2 it
# does.
INVERSION_GUIDANCE = 2.0


class FireFlowScheduler(FlowMatchEulerDiscreteScheduler):
    """FireFlow's sampler for a diffusers pipeline loop: N steps from the config's noise levels, N + 1 model calls.

    The pipeline's latents are the midpoint states x(m_k), m_k = (s_k + s_{k+1}) / 2, after a first call at s_0.
    A step undoes the half step that reached the midpoint (with the velocity that made it), takes the whole step with
    the midpoint's velocity, and moves on to the next midpoint with that same velocity. Callbacks (local blend) that
    change the latents change the midpoint state, and the step follows from there.
    """

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None,
                      timesteps=None):
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        self.grid = self.sigmas.clone()  # (steps + 1,) noise levels from the first to 0: the steps' ends
        calls = torch.cat([self.grid[:1], (self.grid[:-1] + self.grid[1:]) / 2])  # (steps + 1,) where v is evaluated
        self.timesteps = (calls * self.config.num_train_timesteps).to(self.timesteps.dtype)
        self.sigmas = torch.cat([calls, calls.new_zeros(1)])
        self.num_inference_steps = len(self.timesteps)
        self._velocity = None

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        grid = self.grid.to(sample.device, torch.float32)
        v, x = model_output.float(), sample.float()
        if i == 0:  # at the start point: half a step to the first midpoint
            nxt = x + (grid[1] - grid[0]) / 2 * v
        else:
            k = i - 1  # this call was at the midpoint of step k: s_k -> s_{k+1}
            d = grid[k + 1] - grid[k]
            end = x - d / 2 * self._velocity + d * v
            nxt = end + (grid[k + 2] - grid[k + 1]) / 2 * v if k + 2 < len(grid) else end
        self._velocity = v
        return _stepped(self, nxt.to(model_output.dtype), return_dict)


def is_flow(pipe) -> bool:
    """Whether the pipeline samples by flow matching (its family's: SD3, Flux)."""
    from .families import family_of

    return family_of(pipe).flow


def flow_sampler(pipe, method: str) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler that samples back from a `method` inversion, made from the pipeline's scheduler config."""
    return SOLVERS[method].from_config(pipe.scheduler.config)


def _stepped(scheduler, sample: torch.Tensor, return_dict: bool):
    """A scheduler step's end, as diffusers' schedulers end theirs: the index moves on, the sample is returned."""
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

    scheduler._step_index += 1
    return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=sample) if return_dict else (sample,)


class RFSolverScheduler(FlowMatchEulerDiscreteScheduler):
    """RF-Solver-2's sampler for a diffusers pipeline loop: N steps from the config's noise levels, 2N model calls,
    at each step's start s_k and at its midpoint m_k. The pipeline's latents alternate x(s_k) and the midpoint state;
    a step from the midpoint undoes the half step that reached it, so callbacks that change it (local blend) are
    followed: x_{k+1} = x_mid - h / 2 v_k + h / 2 v_k + h^2 / 2 (v_mid - v_k) / (h / 2) = x_mid - h / 2 v_k + h v_mid.
    """

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None,
                      timesteps=None):
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        self.grid = self.sigmas.clone()  # (steps + 1,) noise levels from the first to 0: the steps' ends
        mids = (self.grid[:-1] + self.grid[1:]) / 2
        calls = torch.stack([self.grid[:-1], mids], 1).flatten()  # (2 * steps,) s_0, m_0, s_1, m_1, ...
        self.timesteps = (calls * self.config.num_train_timesteps).to(self.timesteps.dtype)
        self.sigmas = torch.cat([calls, calls.new_zeros(1)])
        self.num_inference_steps = len(self.timesteps)
        self._velocity = None

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        k = i // 2  # step s_k -> s_{k+1}
        grid = self.grid.to(sample.device, torch.float32)
        h = grid[k + 1] - grid[k]
        v, x = model_output.float(), sample.float()
        if i % 2 == 0:  # at s_k: half a step to the midpoint
            nxt = x + h / 2 * v
            self._velocity = v
        else:  # at the midpoint: the Taylor step, from the midpoint state
            nxt = x - h / 2 * self._velocity + h * v
        return _stepped(self, nxt.to(model_output.dtype), return_dict)


SOLVERS = {"fireflow": FireFlowScheduler, "euler": FlowMatchEulerDiscreteScheduler, "rf-solver": RFSolverScheduler}


@contextmanager
def flow_scheduler(pipe, method: str):
    """The pipeline samples with the inversion method's solver inside the block, and gets its own scheduler back."""
    original = pipe.scheduler
    pipe.scheduler = flow_sampler(pipe, method)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = original


def shift_mu(config, tokens: int) -> float:
    """The dynamic shift of the noise levels for an image of this many tokens: linear in the token count from
    base_shift at base_image_seq_len to max_shift at max_image_seq_len (the formula of diffusers' Flux and SD3
    pipelines, `calculate_shift`; the defaults are theirs: 256, 4096, 0.5, 1.15)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return tokens * slope + base - slope * base_len


def set_flow_timesteps(pipe, scheduler, steps: int, shape: tuple[int, ...] | None = None) -> None:
    """Set the scheduler's steps as the pipeline's own loop does for latents of this image-layout shape (the family's
    `latents.timesteps`: its noise levels and shift); without a shape or a family (a bare solver), the scheduler's
    own steps."""
    from .families import family_of

    side = family_of(pipe).latents if shape is not None else None
    kwargs = {} if side is None else side.timesteps(pipe, scheduler.config, steps, shape)
    scheduler.set_timesteps(steps, **kwargs)


def velocity(pipe, prompt: str, guidance: float, max_sequence_length: int | None = None,
             shape: tuple[int, ...] | None = None):
    """v(x, t) under the caption, as the pipeline's own loop computes it (the family's `latents.velocity`: its text
    encoders, ids, guidance and conventions), x in the loop layout of latents whose image layout has this shape, t in
    the scheduler's timesteps."""
    from .errors import ModelError
    from .families import family_of

    family = family_of(pipe)
    if family.latents is None:
        raise ModelError(f"real images on {family.title} need a flow-matching family with a real-image side")
    return family.latents.velocity(pipe, prompt, guidance, max_sequence_length, shape)


def invert_flow(pipe, latent: torch.Tensor, v, steps: int, method: str, progress: bool = True,
                shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The noise at s = 1 whose sampling (with `flow_sampler(pipe, method)`, `steps` steps) returns `latent` (s = 0),
    up to the solver's error. latent: in the pipeline's loop layout, scaled as it holds them; shape: its image
    layout's (the noise levels depend on it: `set_flow_timesteps`)."""
    sampler = flow_sampler(pipe, method)
    set_flow_timesteps(pipe, sampler, steps, shape)
    dtype = latent.dtype
    x = latent.float()
    if method == "euler":
        grid = sampler.sigmas.float()  # (steps + 1,) descending to 0
        at = torch.cat([sampler.timesteps.float()[1:], grid.new_zeros(1)])  # the lower end of each step, in t
        for k in tqdm(range(steps - 1, -1, -1), desc="Euler inversion", disable=not progress, leave=False):
            x = x + (grid[k] - grid[k + 1]) * v(x.to(dtype), at[k]).float()
        return x.to(dtype)
    if method == "rf-solver":  # the same starts and midpoints as sampling, walked upwards
        grid, scale = sampler.grid.float(), sampler.config.num_train_timesteps
        for k in tqdm(range(steps - 1, -1, -1), desc="RF-Solver inversion", disable=not progress, leave=False):
            h = grid[k] - grid[k + 1]  # upwards: s_{k+1} -> s_k
            here = v(x.to(dtype), grid[k + 1] * scale).float()
            mid = v((x + h / 2 * here).to(dtype), (grid[k] + grid[k + 1]) / 2 * scale).float()
            x = x + h * here + h * h / 2 * (mid - here) / (h / 2)
        return x.to(dtype)
    grid = sampler.grid.float()  # FireFlow: the same midpoints as sampling, walked upwards
    calls = sampler.timesteps.float()  # [s_0, m_0, ..., m_{steps-1}] * scale
    start = v(x.to(dtype), grid.new_zeros(())).float()  # at s = 0: the first half step upwards
    x_mid = x + (grid[steps - 1] - grid[steps]) / 2 * start
    previous = start
    for k in tqdm(range(steps - 1, -1, -1), desc="FireFlow inversion", disable=not progress, leave=False):
        d = grid[k] - grid[k + 1]  # upwards: s_{k+1} -> s_k
        here = v(x_mid.to(dtype), calls[k + 1]).float()  # the velocity at m_k
        x = x_mid - d / 2 * previous + d * here
        x_mid = x + (grid[k - 1] - grid[k]) / 2 * here if k > 0 else x
        previous = here
    return x.to(dtype)
