"""No host reads in the denoising loop: attention control reads no device value on the host between the first and the
last step that stock generation does not read too (on a GPU each such read stalls the queue of kernel launches)."""

import pytest
import torch

from prompt2prompt import testing
from prompt2prompt.attention import Controllers
from prompt2prompt.edits import EditOptions, edit
from prompt2prompt.families import family_of
from prompt2prompt.generation import GenerationOptions, generate, guidance_arguments
from prompt2prompt.profiling import LoopWatch
from prompt2prompt.store import AttentionStore
from prompt2prompt.testing import tiny_pipeline

KINDS = [k for k in testing.KINDS if k != "sd2"]  # SD 2.x routes as SD 1.x does
OPTS = GenerationOptions(steps=4, seed=0, height=32, width=32, max_sequence_length=16)
PROMPTS = ["a red circle and a blue square", "a red circle and a blue cross"]


@pytest.fixture(scope="module")
def tiny(pipes, joint_pipes):
    return {kind: {**pipes, **joint_pipes}[kind] for kind in KINDS}


def _options(pipe):
    options = OPTS if hasattr(pipe, "transformer") else OPTS.__class__(steps=OPTS.steps, seed=OPTS.seed)
    return options.resolved(pipe)  # the pipeline's own guidance, as generate takes it


def _reads(pipe, what: str):
    options = _options(pipe)
    with LoopWatch(options.steps) as watch:
        if what == "stock":  # the pipeline alone (no processor of ours): the window opened by its own callback
            def window(pipe_, step, timestep, kwargs):
                watch.step_end(step, timestep, kwargs["latents"])
                return {}

            args = dict(prompt=list(PROMPTS), num_inference_steps=options.steps, height=options.height,
                        width=options.width, output_type="latent", max_sequence_length=options.max_sequence_length,
                        **guidance_arguments(pipe, options.guidance, None, len(PROMPTS)))  # guided as ours are
            family_of(pipe).run(pipe, args, window)  # the pipeline's call with the callback (Flux.3: its blocks)
        elif what == "attend":
            generate(pipe, PROMPTS[:1], Controllers(AttentionStore(), watch), options, progress=False)
        else:
            edit(pipe, PROMPTS[0], PROMPTS[1], EditOptions(blend=("square", "cross")), options, vanilla=False,
                 progress=False, extra=watch)
    return watch.reads


@pytest.mark.parametrize("kind", KINDS)
def test_controlled_loops_read_nothing_on_the_host_that_stock_does_not(tiny, kind):
    pipe = tiny[kind]
    stock = _reads(pipe, "stock")
    for what in ("attend", "edit"):
        reads = _reads(pipe, what)
        extra = {k: v - stock[k] for k, v in reads.items() if v > stock[k]}
        assert not extra, f"{kind} {what}: host reads inside the loop that stock does not do: {extra}"


def test_the_watch_sees_a_host_read_in_the_loop(tiny):
    """The check itself: a controller that reads a value each step is caught."""
    from prompt2prompt.attention import AttentionController

    class Reader(AttentionController):
        def wants(self, site):
            return site.layer.is_cross

        def attention(self, probs, site):
            probs.sum().item()

    pipe = tiny["sd1"]
    with LoopWatch(4) as watch:
        generate(pipe, PROMPTS[:1], Controllers(Reader(), watch), GenerationOptions(steps=4), progress=False)
    assert watch.reads["aten::_local_scalar_dense"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_no_synchronisation_in_our_code_on_cuda(tmp_path, kind, monkeypatch):
    """On a GPU: every processor call and step callback of ours runs under torch.cuda.set_sync_debug_mode("error")."""
    from prompt2prompt import attention, joint

    def strict(fn):
        def run(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    pipe = tiny_pipeline(kind, tmp_path).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    options = _options(pipe)
    generate(pipe, PROMPTS[:1], AttentionStore(), options, progress=False)  # first calls read shapes: not in the loop
    monkeypatch.setattr(attention.RoutedProcessor, "_call", strict(attention.RoutedProcessor._call))
    monkeypatch.setattr(joint.JointRoutedProcessor, "_call", strict(joint.JointRoutedProcessor._call))
    monkeypatch.setattr(attention.Router, "callback", strict(attention.Router.callback))
    edit(pipe, PROMPTS[0], PROMPTS[1], EditOptions(blend=("square", "cross")), options, vanilla=False, progress=False)
    generate(pipe, PROMPTS[:1], AttentionStore(), options, progress=False)
