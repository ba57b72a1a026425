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
    assert again.tokenizer.model_max_length == 77
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
