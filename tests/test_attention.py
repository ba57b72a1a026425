import numpy as np
import pytest
import torch

from prompt2prompt.attention import AttentionController, RoutedProcessor, control
from prompt2prompt.generation import GenerationOptions, generate, initial_latent
from prompt2prompt.store import AttentionStore, RecordOptions

OPTS = GenerationOptions(steps=4, seed=3)


def stock_images(pipe, prompts, opts=OPTS):
    opts = opts.resolved(pipe)  # the pipeline's own guidance where the options leave it unset, as generate does
    latent = initial_latent(pipe, opts)
    latents = latent.expand(len(prompts), *latent.shape[1:]).clone()
    out = pipe(prompts, num_inference_steps=opts.steps, guidance_scale=opts.guidance, latents=latents,
               output_type="np")
    return out.images


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_recording_leaves_images_equal_to_stock(pipes, kind):
    pipe = pipes[kind]
    prompts = ["a red circle and a blue square", "a green cross"]
    stock = stock_images(pipe, prompts)
    plain = generate(pipe, prompts, None, OPTS, progress=False)
    store = AttentionStore(RecordOptions(self_res=(16, 8)))
    recorded = generate(pipe, prompts, store, OPTS, progress=False)
    for i in range(2):
        ref = np.clip(stock[i], 0, 1) * 255
        assert np.abs(np.asarray(plain.images[i], dtype=np.float64) - ref).max() <= 0.5 + 1e-3
        assert np.abs(np.asarray(recorded.images[i], dtype=np.float64) - ref).max() <= 1.0  # float tolerance
    assert any(store.layers[n].is_cross for n in store.sums)
    assert any(not store.layers[n].is_cross for n in store.sums)


def test_explicit_path_matches_sdpa_on_latents(sd1):
    prompts = ["a red circle"]
    plain = generate(sd1, prompts, None, OPTS, progress=False)
    everything = AttentionStore(RecordOptions(self_res=(16, 8, 4)))
    recorded = generate(sd1, prompts, everything, OPTS, progress=False)
    torch.testing.assert_close(recorded.latents, plain.latents, atol=1e-4, rtol=1e-4)


def test_recorded_rows_sum_to_one_and_only_conditional_half(sd1):
    seen = []

    class Probe(AttentionController):
        def wants(self, site):
            return True

        def attention(self, probs, site):
            seen.append((site.layer.is_cross, probs.shape, probs.sum(-1)))
            return None

    generate(sd1, ["a red circle", "a blue square"], Probe(), OPTS, progress=False)
    assert seen
    for _, shape, sums in seen:
        assert shape[0] == 2  # two prompts: the unconditional half is not handed over
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    assert {c for c, _, _ in seen} == {True, False}


def test_store_means_are_distributions(sd1):
    store = AttentionStore()
    generate(sd1, ["a red circle"], store, OPTS, progress=False)
    for name in store.select(cross=True):
        mean = store.mean(name)  # (prompts, heads, pixels, tokens)
        assert store.counts[name] == OPTS.steps
        torch.testing.assert_close(mean.sum(-1), torch.ones(mean.shape[:-1]), atol=1e-5, rtol=0)


def test_store_memory_is_flat_in_steps(sd1):
    sizes = []
    for steps in (10, 50):
        store = AttentionStore()
        generate(sd1, ["a red circle"], store, GenerationOptions(steps=steps, seed=0), progress=False)
        assert all(c == steps for c in store.counts.values())
        sizes.append(store.memory_bytes())
    assert sizes[0] == sizes[1] > 0


def test_steps_come_from_the_pipeline_callback(sd1):
    steps = []

    class Probe(AttentionController):
        def wants(self, site):
            steps.append(site.step)
            return False

    generate(sd1, ["a circle"], Probe(), GenerationOptions(steps=5), progress=False)
    calls_per_step = len(steps) // 5
    assert steps == [s for s in range(5) for _ in range(calls_per_step)]


def test_unwanted_layers_keep_the_original_processor(sd1):
    originals = dict(sd1.unet.attn_processors)
    used = {"explicit": 0}

    class CrossOnly(AttentionController):
        def wants(self, site):
            return site.layer.is_cross

    real_explicit = RoutedProcessor.explicit

    def counting(self, *a, **k):
        used["explicit"] += 1
        assert self.layer.is_cross
        return real_explicit(self, *a, **k)

    RoutedProcessor.explicit = counting
    try:
        generate(sd1, ["a circle"], CrossOnly(), GenerationOptions(steps=2), progress=False)
    finally:
        RoutedProcessor.explicit = real_explicit
    cross_layers = sum(1 for n in originals if "attn2" in n)
    assert used["explicit"] == cross_layers * 2  # every cross layer, both steps; no self layer
    assert dict(sd1.unet.attn_processors) == originals


def test_processors_restored_after_an_exception(sd1):
    originals = dict(sd1.unet.attn_processors)

    class Boom(AttentionController):
        def wants(self, site):
            return True

        def attention(self, probs, site):
            if site.step == 1:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        generate(sd1, ["a circle"], Boom(), GenerationOptions(steps=3), progress=False)
    assert dict(sd1.unet.attn_processors) == originals
    assert not sd1.unet._forward_pre_hooks


def test_control_installs_routed_processors_and_restores(sd1):
    originals = dict(sd1.unet.attn_processors)
    with control(sd1, AttentionController()):
        assert all(isinstance(p, RoutedProcessor) for p in sd1.unet.attn_processors.values())
    assert dict(sd1.unet.attn_processors) == originals


def test_edit_returned_probabilities_are_used(sd1):
    """A controller that replaces the probabilities changes the image; one returning them unchanged does not."""

    class Uniform(AttentionController):
        def wants(self, site):
            return site.layer.is_cross

        def attention(self, probs, site):
            return torch.full_like(probs, 1.0 / probs.shape[-1])

    plain = generate(sd1, ["a red circle"], None, OPTS, progress=False)
    edited = generate(sd1, ["a red circle"], Uniform(), OPTS, progress=False)
    assert (edited.latents - plain.latents).abs().max() > 1e-3


def test_without_guidance_every_row_is_conditional(sd1):
    shapes = []

    class Probe(AttentionController):
        def wants(self, site):
            return site.layer.is_cross

        def attention(self, probs, site):
            shapes.append(probs.shape[0])

    generate(sd1, ["a red circle", "a blue square"], Probe(), GenerationOptions(steps=2, guidance=1.0),
             progress=False)
    generate(sd1, ["a red circle", "a blue square"], Probe(), GenerationOptions(steps=2, guidance=5.0),
             progress=False)
    assert set(shapes) == {2}


def test_per_step_series_for_chosen_layers(sd1):
    store = AttentionStore(RecordOptions(steps=(0, 1)), series=lambda site: site.layer.is_cross and site.res == (8, 8))
    generate(sd1, ["a red circle"], store, GenerationOptions(steps=5), progress=False)
    assert store.series and all(len(v) == 5 for v in store.series.values())
    assert all(v[0].shape == (1, 64, 77) for v in store.series.values())  # (prompts, pixels, tokens), head mean
    assert set(store.counts.values()) == {1}  # the sums kept only step 0
    name = next(iter(store.series))
    torch.testing.assert_close(store.series[name][0], store.mean(name).mean(1))


STOCHASTIC = {
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "ddim-eta": ("DDIMScheduler", {"eta": 1.0}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
}


def with_scheduler(pipe, name: str, **config):
    import diffusers

    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, name).from_config(original.config, **config)
    return original


@pytest.mark.parametrize("kind", sorted(STOCHASTIC))
def test_stochastic_schedulers_are_seeded_and_share_noise(sd1, kind):
    """The same seed gives the same images; identical prompts in one batch stay identical (every prompt gets the same
    noise at every step); one prompt reproduces the stock pipeline called with the seed's generator."""
    name, extra = STOCHASTIC[kind]
    config = {k: v for k, v in extra.items() if k != "eta"}
    kwargs = {"eta": extra["eta"]} if "eta" in extra else {}
    original = with_scheduler(sd1, name, **config)
    try:
        opts = GenerationOptions(steps=4, seed=5)
        a = generate(sd1, ["a red circle", "a red circle"], None, opts, progress=False, **kwargs)
        b = generate(sd1, ["a red circle", "a red circle"], None, opts, progress=False, **kwargs)
        torch.testing.assert_close(a.latents, b.latents, atol=0, rtol=0)
        torch.testing.assert_close(a.latents[0], a.latents[1], atol=0, rtol=0)
        other = generate(sd1, "a red circle", None, GenerationOptions(steps=4, seed=6), progress=False, **kwargs)
        assert (other.latents[0] - a.latents[0]).abs().max() > 1e-3  # the noise depends on the seed
        one = generate(sd1, "a red circle", None, opts, progress=False, **kwargs)
        stock = sd1("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(5),
                    output_type="latent", **kwargs).images
        torch.testing.assert_close(one.latents, stock, atol=1e-6, rtol=1e-6)
    finally:
        sd1.scheduler = original


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_second_order_schedulers_report_their_real_loop(sd1, name):
    """Heun and KDPM2 run 2N-1 loop iterations for N steps: the run knows it, steps count iterations."""
    runs, steps = [], []

    class Probe(AttentionController):
        def begin(self, run):
            runs.append(run)

        def wants(self, site):
            steps.append(site.step)
            return False

    original = with_scheduler(sd1, name)
    try:
        generate(sd1, ["a circle"], Probe(), GenerationOptions(steps=5), progress=False)
    finally:
        sd1.scheduler = original
    assert runs[0].steps == 9 and sorted(set(steps)) == list(range(9))


def test_small_map_rule():
    from prompt2prompt.attention import small_map_sides

    assert small_map_sides((64, 64), (64, 32, 16, 8)) == (16, 16)  # SD at 512 px: the p2p code's 16x16 maps
    assert small_map_sides((16, 16), (16, 8, 4)) == (4, 16)  # the shapes model: blend on its full 16x16 maps
    assert small_map_sides((128, 128), (64, 32)) == (32, 32)  # SDXL at 1024 px
    assert small_map_sides((96, 64), (96, 48, 24, 12)) == (24, 24)  # the longer side counts


def test_run_knows_the_models_map_sides(sd1):
    runs = []

    class Probe(AttentionController):
        def begin(self, run):
            runs.append(run)

    generate(sd1, ["a circle"], Probe(), GenerationOptions(steps=2, height=64, width=96), progress=False)
    run = runs[0]
    assert run.latent_size == (32, 48) and run.sides == (48, 24) and run.steps == 2
    assert (run.self_side, run.map_side) == (12, 24)


def test_non_square_maps_have_their_true_shape(sd1):
    shapes = set()

    class Probe(AttentionController):
        def wants(self, site):
            return site.layer.is_cross

        def attention(self, probs, site):
            assert probs.shape[2] == site.pixels
            shapes.add(site.res)

    generate(sd1, ["a circle"], Probe(), GenerationOptions(steps=1, height=64, width=96), progress=False)
    assert shapes == {(32, 48), (16, 24)}


def test_processor_keyword_arguments_reach_the_original_processor(sd1):
    """cross_attention_kwargs that a custom processor declares still reach it on layers the controller leaves alone."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Gain(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, gain=1.0):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * gain

    originals = dict(sd1.unet.attn_processors)
    sd1.unet.set_attn_processor({k: Gain() if "attn1" in k else v for k, v in originals.items()})
    try:
        kwargs = {"cross_attention_kwargs": {"gain": 1.5}}
        plain = generate(sd1, ["a circle"], None, OPTS, progress=False, **kwargs)
        controlled = generate(sd1, ["a circle"], AttentionController(), OPTS, progress=False, **kwargs)
        unscaled = generate(sd1, ["a circle"], None, OPTS, progress=False)
    finally:
        sd1.unet.set_attn_processor(dict(originals))
    torch.testing.assert_close(controlled.latents, plain.latents, atol=0, rtol=0)
    assert (plain.latents - unscaled.latents).abs().max() > 1e-3  # the gain took effect


def test_controlling_a_custom_processor_is_refused(sd1):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from prompt2prompt.errors import P2PError

    class Custom(AttnProcessor2_0):
        pass

    originals = dict(sd1.unet.attn_processors)
    sd1.unet.set_attn_processor({k: Custom() for k in originals})
    try:
        with pytest.raises(P2PError, match="Custom"):
            generate(sd1, ["a circle"], AttentionStore(), OPTS, progress=False)
    finally:
        sd1.unet.set_attn_processor(dict(originals))


def test_overlapping_generations_wait_for_each_other(sd1):
    """Two threads generating on one pipeline: each gets what it would get alone, processors are restored."""
    import threading

    originals = dict(sd1.unet.attn_processors)
    alone = [generate(sd1, [p], AttentionStore(), OPTS, progress=False).latents for p in ("a circle", "a square")]
    results = {}

    def work(prompt, k):
        results[k] = generate(sd1, [prompt], AttentionStore(), OPTS, progress=False).latents

    threads = [threading.Thread(target=work, args=(p, k)) for k, p in enumerate(("a circle", "a square"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        torch.testing.assert_close(results[k], alone[k], atol=0, rtol=0)
    assert dict(sd1.unet.attn_processors) == originals


def test_reading_a_prompts_tokens_waits_for_a_generation_in_another_thread(sd1):
    """A fast tokenizer called from two threads at once fails ("Already borrowed"): a prompt's tokens are read under
    the pipeline's lock, which a generation holds while its pipeline tokenizes."""
    import threading

    from prompt2prompt.routing import exclusive
    from prompt2prompt.tokens import prompt_tokens

    read = []
    with exclusive(sd1):  # a generation in progress in this thread
        reader = threading.Thread(target=lambda: read.append(prompt_tokens(sd1, "a red circle")))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive() and not read  # waits for the lock
    reader.join()
    assert read[0].word_list() == ["a", "red", "circle"]


def test_generation_leaves_the_callers_pipeline_as_it_was(sd1):
    sd1.set_progress_bar_config(disable=True, desc="mine")
    scheduler = sd1.scheduler
    generate(sd1, ["a circle"], AttentionStore(), GenerationOptions(steps=2), progress=True)
    assert sd1._progress_bar_config == {"disable": True, "desc": "mine"}
    assert sd1.scheduler is scheduler
    sd1.set_progress_bar_config(disable=True)
