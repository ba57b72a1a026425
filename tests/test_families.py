"""The family seam: one record per pipeline, read by every module; no import circles; the shared text-to-options and
sample-back functions."""

import ast
from pathlib import Path

import pytest
import torch

from prompt2prompt.edits import EditOptions
from prompt2prompt.errors import ModelError, PromptError
from prompt2prompt.families import FAMILIES, family_of
from prompt2prompt.testing import KINDS

PACKAGE = Path(__file__).parents[1] / "src" / "prompt2prompt"


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_each_pipeline_has_its_family_once(kind, pipes, joint_pipes):
    if kind not in KINDS:
        pytest.skip(f"this diffusers has no {FAMILIES[kind].title} pipeline")
    pipe = {**pipes, **joint_pipes}[kind]
    family = family_of(pipe)
    assert family is FAMILIES[kind] and family_of(pipe) is family  # computed once, the same record after
    assert family.joint == (kind in ("sd3", "flux", "flux2", "flux2dev", "flux3", "qwenimage", "qwenimage21", "zimage"))
    assert family.flow == family.joint
    assert family.packed == (kind in ("flux", "flux2", "flux2dev", "flux3", "qwenimage", "qwenimage21"))
    assert family.guidance_calls == (kind in ("flux2", "flux3", "qwenimage", "qwenimage21"))
    assert family.batch_padded == (kind in ("flux3", "qwenimage", "qwenimage21", "zimage"))
    assert family.conditional_first == (kind == "zimage")
    assert family.pooled == (kind in ("sdxl", "sd3")) and family.added_conditions == (kind == "sdxl")
    # the record agrees with what the pipeline holds (the probes it replaced)
    assert family.packed == (hasattr(pipe, "_pack_latents") or kind == "flux3")  # Flux.3: its latent step packs
    assert family.pooled == (kind != "flux" and getattr(pipe, "text_encoder_2", None) is not None)
    assert family.added_conditions == (getattr(getattr(pipe, "unet", None), "config", {}).get("addition_embed_type")
                                       == "text_time")
    assert family.invertible and (family.latents is not None) == family.flow  # every family takes real images
    net = pipe.transformer if family.joint else pipe.unet
    assert family_of(net).denoiser == family.denoiser  # a bare network (training) is routed the same way


def test_a_pipeline_class_the_table_does_not_name_is_known_by_its_parts(pipes):
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipes["sd1"].components)
    assert family_of(img2img) is FAMILIES["sd1"]
    with pytest.raises(ModelError, match="expected a Stable Diffusion .* pipeline, got object"):
        family_of(object())


def _imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports (at the top or inside functions)."""
    modules = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f  # a package's __init__ is the package
    graph = {}
    for name, path in modules.items():
        # the package a relative import starts from: the module's own for a package's __init__
        package = (name.split(".") if name else []) if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join([*base, *([node.module] if node.module else [])])
                for candidate in (target, *(f"{target}.{a.name}".lstrip(".") for a in node.names)):
                    if candidate in modules and candidate != name:
                        found.add(candidate)
        graph[name] = found
    return graph


def test_no_import_circles():
    graph = _imports()
    assert {"routing", "families"} <= graph["attention"] and "joint" in graph["attention"]
    state: dict[str, int] = {}

    def visit(module, trail):
        if state.get(module) == 1:
            pytest.fail("import circle: " + " -> ".join([*trail[trail.index(module):], module]))
        if state.get(module) == 2:
            return
        state[module] = 1
        for other in sorted(graph[module]):
            visit(other, [*trail, module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])
    assert not graph["routing"] & {"attention", "joint"}  # the neutral router knows no installer
    assert "cli" not in graph["ui"] and "cli" not in graph["sweep"]  # the page and sweeps use public library calls


def test_options_from_text_are_the_options_built_by_hand():
    typed = EditOptions.from_text(cross_steps="default=1.0,circle=0.4", self_steps="0.1,0.4",
                                  reweight=["red=2", "blue=-1"], blend=["circle"], threshold=0.4)
    assert typed == EditOptions(cross_steps={"default": 1.0, "circle": 0.4}, self_steps=(0.1, 0.4),
                                reweight=(("red", 2.0), ("blue", -1.0)), blend=("circle",), threshold=0.4)
    assert EditOptions.from_text(reference="stable") == EditOptions.reference("stable")
    assert EditOptions.from_text(reference="null-text", blend_start=0.5) == \
        EditOptions.reference("null-text", blend_start=0.5)
    for bad, match in [(dict(reweight=["red"]), "WORD=FACTOR"), (dict(reweight=["red=inf"]), "finite factor"),
                       (dict(self_steps="default=0.4"), "not per word")]:
        with pytest.raises(PromptError, match=match):
            EditOptions.from_text(**bad)


def test_sample_back_is_the_inversions_own_sampling(sd1):
    from PIL import Image

    from prompt2prompt.generation import GenerationOptions, generate
    from prompt2prompt.inversion import InversionOptions, invert, sample_back, sampler, sampling_kwargs

    image = Image.new("RGB", (32, 32), (200, 40, 40))
    inv = invert(sd1, image, "a red square", InversionOptions(method="null-text", steps=3, inner_steps=2),
                 progress=False)
    with sampler(sd1, inv):
        by_hand = generate(sd1, "a red square", None, GenerationOptions(steps=3, guidance=inv.options.guidance),
                           progress=False, **sampling_kwargs(inv))
    scheduler = sd1.scheduler
    back = sample_back(sd1, inv, progress=False)
    torch.testing.assert_close(back.latents, by_hand.latents, atol=0, rtol=0)
    assert sd1.scheduler is scheduler  # the pipeline's own scheduler is given back
    edited = sample_back(sd1, inv, ["a red square", "a red cross"], progress=False)
    torch.testing.assert_close(edited.latents[:1], back.latents, atol=1e-4, rtol=1e-4)  # batched: float noise
