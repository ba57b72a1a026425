"""The shipped shapes model: it loads by name, is a standard SD pipeline, and draws the colours it is asked for."""

import numpy as np
import pytest

from prompt2prompt.generation import GenerationOptions, generate
from prompt2prompt.loading import BUNDLED, family
from prompt2prompt.shapes.evaluate import segment


def test_bundled_model_is_a_standard_pipeline(shapes):
    from diffusers import StableDiffusionPipeline

    assert type(shapes).__name__ == "StableDiffusionPipeline" and family(shapes) == "sd1"
    again = StableDiffusionPipeline.from_pretrained(BUNDLED["shapes"], local_files_only=True)
    assert again.tokenizer.model_max_length == shapes.tokenizer.model_max_length  # (16: the world's captions fit)
    size = sum(p.stat().st_size for p in BUNDLED["shapes"].rglob("*") if p.is_file())
    assert size < 25 * 2**20


@pytest.mark.parametrize("colour", ["red", "green", "blue", "yellow"])
def test_single_objects_have_the_asked_colour(shapes, colour):
    prompts = [f"a {colour} circle", f"a {colour} square"]
    for seed in (0, 1):
        out = generate(shapes, prompts, None, GenerationOptions(steps=20, seed=seed), progress=False)
        for image in out.images:
            regions = segment(np.asarray(image, dtype=np.float32) / 255)
            assert colour in regions, f"{colour} missing (found {sorted(regions)}) for seed {seed}"
            biggest = max(regions, key=lambda c: regions[c].sum())
            assert biggest == colour


@pytest.fixture(scope="module")
def shapes_flow():
    from prompt2prompt.loading import load_pipeline

    if not (BUNDLED["shapes-flow"] / "model_index.json").exists():
        pytest.skip("the shapes-flow model is not shipped: its training has not passed its bars")
    return load_pipeline("shapes-flow")


def test_bundled_flow_model_loads_with_plain_diffusers(shapes_flow):
    from diffusers import StableDiffusion3Pipeline

    assert family(shapes_flow) == "sd3"
    again = StableDiffusion3Pipeline.from_pretrained(BUNDLED["shapes-flow"], text_encoder_3=None, tokenizer_3=None,
                                                     local_files_only=True)
    assert type(again.transformer).__name__ == "SD3Transformer2DModel"
    size = sum(p.stat().st_size for p in BUNDLED["shapes-flow"].rglob("*") if p.is_file())
    assert size < 25 * 2**20


def test_bundled_flow_model_edits_and_inverts(shapes_flow):
    """A short replace edit with local blend runs; a FireFlow inversion of a rendered scene comes back close to the
    autoencoder's own reconstruction, and closer than Euler at the same number of model calls."""
    import random

    from prompt2prompt.edits import EditOptions, edit
    from prompt2prompt.inversion import (
        InversionOptions,
        autoencoder_reconstruction,
        invert,
        psnr,
        sampler,
        sampling_kwargs,
    )
    from prompt2prompt.shapes import world

    source, target = "a red circle and a blue square", "a red circle and a blue triangle"
    r = edit(shapes_flow, source, target, EditOptions(blend=("square", "triangle")),
             GenerationOptions(steps=8, seed=2, max_sequence_length=16), vanilla=False, progress=False)
    assert r.mask is not None and r.controlled.images[1].size == (64, 64)
    image = world.scene_from_caption(source, random.Random(3)).image()
    scores = {}
    for method, steps in (("fireflow", 12), ("euler", 13)):  # 13 model calls each
        inv = invert(shapes_flow, image, source, InversionOptions(method=method, steps=steps, max_sequence_length=16),
                     progress=False)
        with sampler(shapes_flow, inv):
            again = GenerationOptions(steps=steps, guidance=inv.options.guidance, max_sequence_length=16)
            rec = generate(shapes_flow, source, None, again, progress=False, **sampling_kwargs(inv)).images[0]
        scores[method] = psnr(rec, autoencoder_reconstruction(shapes_flow, inv.image))
    assert scores["fireflow"] > 30 and scores["fireflow"] > scores["euler"], scores
