"""Tracing the user's own pipeline call: the same maps and edits as the library's own generation, steps counted
without anything passed to the call, the user's callback left as it was, everything restored."""

from __future__ import annotations

import pytest
import torch

from prompt2prompt import testing, trace
from prompt2prompt.attend import attend
from prompt2prompt.edits import EditOptions, edit
from prompt2prompt.errors import P2PError, PromptError
from prompt2prompt.generation import GenerationOptions, guidance_arguments, initial_latent
from prompt2prompt.routing import denoiser

PROMPT = "a red circle and a blue square"
EDIT = ["a red circle and a blue square", "a red circle and a blue triangle"]


def _call(pipe, prompts, options, **extra):
    """The pipeline called as a user would, from the latent the library's generation starts from."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    options = options.resolved(pipe)
    latent = initial_latent(pipe, options)
    return pipe(prompt=list(prompts), latents=latent.expand(len(prompts), *latent.shape[1:]).clone(),
                num_inference_steps=options.steps, height=options.height, width=options.width,
                **guidance_arguments(pipe, options.guidance, None, len(prompts)), **extra)


# SD 2.x routes as SD 1.x does; Flux.3's modular pipeline has no call of its own to trace (test below)
@pytest.mark.parametrize("kind", [k for k in testing.KINDS if k not in ("sd2", "flux3")])
def test_traced_maps_are_the_library_generations_maps(pipes, joint_pipes, kind):
    pipe = {**pipes, **joint_pipes}[kind]
    options = GenerationOptions(steps=3, height=32, width=32)
    ours = attend(pipe, PROMPT, options, progress=False)
    with trace(pipe) as tc:
        out = _call(pipe, PROMPT, options)
    assert tc.steps == 3 and tc.prompts == [PROMPT]
    torch.testing.assert_close(tc.maps().values, ours.maps().values, atol=1e-6, rtol=1e-5)
    assert tc.maps().word("circle").values.shape == ours.maps().word("circle").values.shape
    assert out.images[0].size == ours.images[0].size


@pytest.mark.parametrize("kind", ["sd1", "sd3", "flux", "zimage"])
def test_a_traced_edit_is_the_library_edit(pipes, joint_pipes, kind):
    pipe = {**pipes, **joint_pipes}[kind]
    options = GenerationOptions(steps=4, height=32, width=32)
    controls = EditOptions(blend=("square", "triangle"))
    ours = edit(pipe, EDIT[0], EDIT[1:], controls, options, vanilla=False, progress=False)
    with trace(pipe, edit=controls, prompts=EDIT) as tc:
        out = _call(pipe, EDIT, options, output_type="latent")
    torch.testing.assert_close(out.images, ours.controlled.latents, atol=1e-4, rtol=1e-4)  # + the recorder
    assert torch.equal(tc.mask, ours.mask)  # the local blend ran at every step, as in the library's loop


def test_the_users_callback_runs_as_given_and_sees_every_step(sd1):
    seen = []

    def mine(pipe, step, timestep, kwargs):
        seen.append(step)
        return {}

    with trace(sd1) as tc:
        _call(sd1, PROMPT, GenerationOptions(steps=3), callback_on_step_end=mine)
    assert seen == [0, 1, 2] and tc.steps == 3


def test_everything_is_restored_even_after_an_error(sd1):
    processors = dict(denoiser(sd1).attn_processors)
    step, encode = sd1.scheduler.step, sd1.encode_prompt
    with pytest.raises(RuntimeError, match="user's own"):
        with trace(sd1):
            raise RuntimeError("the user's own error")
    assert dict(denoiser(sd1).attn_processors) == processors
    assert "step" not in vars(sd1.scheduler) and "encode_prompt" not in vars(sd1)
    assert sd1.scheduler.step == step and sd1.encode_prompt == encode


def test_a_second_call_in_the_block_is_traced_afresh(sd1):
    with trace(sd1) as tc:
        _call(sd1, "a green cross", GenerationOptions(steps=2))
        _call(sd1, PROMPT, GenerationOptions(steps=3))
    assert tc.prompts == [PROMPT] and tc.steps == 3
    assert tc.maps().values.shape[0] == 1 and tc.maps().word("square").label == "square"


def test_a_traced_edit_refuses_a_call_with_other_prompts_before_denoising(sd1):
    with pytest.raises(PromptError, match="made for"), trace(sd1, edit=EditOptions(), prompts=EDIT) as tc:
        _call(sd1, ["a green cross", "a blue cross"], GenerationOptions(steps=2))
    assert tc.steps == 0
    with pytest.raises(PromptError, match="needs its prompts"), trace(sd1, edit=EditOptions()):
        pass


def test_maps_before_any_call_say_so(sd1):
    with trace(sd1) as tc:
        pass
    with pytest.raises(P2PError, match="nothing was traced"):
        tc.maps()
