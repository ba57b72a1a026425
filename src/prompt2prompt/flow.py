"""Rectified-flow inversion for flow-matching pipelines (SD3 / SD3.5, the bundled `shapes-flow`).

A flow-matching model predicts the velocity v = noise - image of the straight path x_s = (1 - s) image + s noise, and
sampling integrates dx/ds = v from s = 1 (noise) down to s = 0. Inversion integrates the same ODE upwards, from the
image's latent at s = 0 to the noise at s = 1, on the grid of noise levels that sampling will walk back down.

- `euler`: x_{k} = x_{k+1} + (s_k - s_{k+1}) v(x_{k+1}, s_{k+1}) upwards, sampled back with the pipeline's own Euler
  steps. First order: each direction's error is O(step), and they do not cancel. N steps: N model calls.
- `fireflow` (Deng et al. 2024, "FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing"): the midpoint
  method, whose midpoint is reached with the velocity from the previous step's midpoint instead of a new model call.
  Second order at one model call per step (N steps: N + 1 calls, the first at the start point), in both directions;
  sampling back uses `FireFlowScheduler`, the same solver as a diffusers scheduler.

Both directions walk the same grid with the same classifier-free guidance, so that the round trip differs only by the
solvers' errors. FireFlow evaluates the velocity at the same midpoints both ways; Euler evaluates at each step's start,
which is the step's other end going the other way (why its errors add up rather than cancel).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm import tqdm

FLOW_METHODS = ("fireflow", "euler")
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
        from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
            FlowMatchEulerDiscreteSchedulerOutput,
        )

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
        self._step_index += 1
        nxt = nxt.to(model_output.dtype)
        if not return_dict:
            return (nxt,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=nxt)


def is_flow(pipe) -> bool:
    """Whether the pipeline samples by flow matching (its family's: SD3, Flux)."""
    from .families import family_of

    return family_of(pipe).flow


def flow_sampler(pipe, method: str) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler that samples back from a `method` inversion, made from the pipeline's scheduler config."""
    cls = FireFlowScheduler if method == "fireflow" else FlowMatchEulerDiscreteScheduler
    return cls.from_config(pipe.scheduler.config)


@contextmanager
def flow_scheduler(pipe, method: str):
    """The pipeline samples with the inversion method's solver inside the block, and gets its own scheduler back."""
    original = pipe.scheduler
    pipe.scheduler = flow_sampler(pipe, method)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = original


def velocity(pipe, prompt: str, guidance: float, max_sequence_length: int | None = None):
    """v(x, t) under the caption, with classifier-free guidance as the SD3 pipeline applies it (one batch [uncond,
    cond])."""
    from .loading import execution_device

    net, device = pipe.transformer, execution_device(pipe)
    kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    guided = guidance > 1
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, do_classifier_free_guidance=guided, device=device,
            **kwargs)
    if guided:
        embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])

    @torch.no_grad()
    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inp = torch.cat([x, x]) if guided else x
        out = net(hidden_states=inp, timestep=t.to(device).expand(inp.shape[0]), encoder_hidden_states=embeds,
                  pooled_projections=pooled, return_dict=False)[0]
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        return out

    return v


def invert_flow(pipe, latent: torch.Tensor, v, steps: int, method: str, progress: bool = True) -> torch.Tensor:
    """The noise at s = 1 whose sampling (with `flow_sampler(pipe, method)`, `steps` steps) returns `latent` (s = 0),
    up to the solver's error. latent: (1, channels, h, w), scaled as the pipeline's latents."""
    sampler = flow_sampler(pipe, method)
    sampler.set_timesteps(steps)
    dtype = latent.dtype
    x = latent.float()
    if method == "euler":
        grid = sampler.sigmas.float()  # (steps + 1,) descending to 0
        at = torch.cat([sampler.timesteps.float()[1:], grid.new_zeros(1)])  # the lower end of each step, in t
        for k in tqdm(range(steps - 1, -1, -1), desc="Euler inversion", disable=not progress, leave=False):
            x = x + (grid[k] - grid[k + 1]) * v(x.to(dtype), at[k]).float()
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
