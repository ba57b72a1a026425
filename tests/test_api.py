"""One obvious way in: `import prompt2prompt as p2p` reaches the whole library, and steps and guidance left unset are
the pipeline's own defaults (recorded as used)."""

from __future__ import annotations

import inspect

import pytest

import prompt2prompt as p2p
from prompt2prompt.generation import pipeline_defaults

# diffusers 0.42's own defaults (their __call__ signatures), in the usual guidance convention: Z-Image's
# `guidance_scale` 5 is pos + 5 (pos - neg), the usual 6; Qwen-Image guides with `true_cfg_scale`
EXPECTED = {"sd1": (50, 7.5), "sd2": (50, 7.5), "sdxl": (50, 5.0), "sd3": (28, 7.0), "flux": (28, 3.5),
            "flux2": (50, 4.0), "flux2dev": (50, 4.0), "qwenimage": (50, 4.0), "zimage": (50, 6.0)}


def test_the_package_reaches_every_entry_point():
    for name in ("load_pipeline", "attend", "edit", "invert", "flowedit", "swap_analysis", "trace", "sample_back",
                 "EditOptions", "GenerationOptions", "InversionOptions", "FlowEditOptions", "RecordOptions"):
        assert name in p2p.__all__ and getattr(p2p, name) is not None, name
    assert p2p.edit.__module__ == "prompt2prompt.edits" and p2p.trace.__module__ == "prompt2prompt.trace"
    assert inspect.signature(p2p.edit).parameters["vanilla"].default is False  # one generation unless asked


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_unset_steps_and_guidance_are_the_pipelines_own(pipes, joint_pipes, kind):
    pipe = {**pipes, **joint_pipes}[kind]
    assert pipeline_defaults(pipe) == EXPECTED[kind]
    resolved = p2p.GenerationOptions(height=32, width=32).resolved(pipe)
    assert (resolved.steps, resolved.guidance) == EXPECTED[kind]
    given = p2p.GenerationOptions(steps=3, guidance=2.0).resolved(pipe)
    assert (given.steps, given.guidance) == (3, 2.0)


def test_what_was_used_is_recorded(joint_pipes):
    pipe = joint_pipes["sd3"]
    r = p2p.attend(pipe, "a red circle", p2p.GenerationOptions(height=32, width=32), progress=False)
    assert (r.settings["steps"], r.settings["guidance"]) == (28, 7.0) and r.generation.options.steps == 28
    e = p2p.edit(pipe, "a red circle", "a blue circle", generation=p2p.GenerationOptions(steps=2, height=32, width=32),
                 progress=False)
    assert e.settings["steps"] == 2 and e.settings["guidance"] == 7.0


def test_results_made_from_the_api_name_their_model(sd1, sd1_folder):
    loaded = p2p.load_pipeline(sd1_folder)
    r = p2p.attend(loaded, "a red circle", p2p.GenerationOptions(steps=2), progress=False)
    assert r.settings["model"] == str(sd1_folder)  # the folder it came from, not ''
    e = p2p.edit(loaded, "a red circle", "a blue circle", generation=p2p.GenerationOptions(steps=2), progress=False)
    assert e.settings["model"] == str(sd1_folder)
    assert p2p.attend(loaded, "a red circle", p2p.GenerationOptions(steps=2), model="mine",
                      progress=False).settings["model"] == "mine"  # as the caller names it
    from prompt2prompt.loading import model_name

    assert model_name(p2p.load_pipeline("shapes")) == "shapes"  # the bundled model by its name
