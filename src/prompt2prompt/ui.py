"""`p2p ui`: a local web page to explore maps, edits, real images and the swap analysis (gradio; `pip install -e
".[ui]"`).

`App` holds one pipeline and answers each tab with plain Python (tested without a browser); `build` lays the tabs out
with gradio and `serve` starts it. Safe by default: it listens on 127.0.0.1, shares nothing publicly unless asked,
refuses uploads over `MAX_UPLOAD_BYTES` or `MAX_PIXELS`, and runs one generation at a time (gradio's queue, and the
pipeline's own lock: the attention processors are one shared slot per pipeline, so two requests never see each
other's controllers). Every error a user can cause comes back as one sentence in the page.
"""

from __future__ import annotations

import functools
import math
import tempfile
from dataclasses import replace
from pathlib import Path

from PIL import Image

from .errors import InputError, P2PError
from .images import MAX_PIXELS  # an upload with more pixels is refused before decoding (a decompression bomb guard)

MAX_UPLOAD_BYTES = 20 * 2**20  # an uploaded image larger than this is refused
MAX_TARGETS = 8  # edited prompts in one request


def _words(text: str | None) -> tuple[str, ...]:
    """'square, triangle' or 'square triangle' -> ('square', 'triangle')."""
    return tuple(w for w in (text or "").replace(",", " ").split() if w)


def _sides(text: str | None) -> tuple[int, ...] | None:
    values = _words(text)
    try:
        sides = tuple(int(v) for v in values)
    except ValueError:
        raise InputError(f"expected whole numbers separated by spaces (such as 8 16), got {text!r}") from None
    if any(s < 1 for s in sides):
        raise InputError(f"expected positive whole numbers, got {text!r}")
    return sides or None


def check_upload(path: str | Path | None) -> Image.Image:
    """An uploaded image within the limits (bytes, then pixels before decoding: `images.read_image`), read; a clear
    error otherwise."""
    from .images import read_image

    if not path:
        raise InputError("upload an image first")
    size = Path(path).stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise InputError(f"the image is {size / 2**20:.1f} MB; at most {MAX_UPLOAD_BYTES / 2**20:.0f} MB is accepted")
    return read_image(path, max_pixels=MAX_PIXELS, label="the upload")


def check_address(host: str, port: int) -> None:
    """The page can listen on host:port (a port from 1 to 65535, free, on an address of this machine)."""
    import socket

    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InputError(f"--port must be from 1 to 65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise InputError(f"--host {host!r} is not an address of this machine ({err})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as err:
            why = "is in use" if err.errno in (98, 48) else f"cannot be used ({err.strerror})"
            raise InputError(f"{host}:{port} {why}; expected a free port on an address of this machine (--host, "
                             "--port)") from None


def user_errors(fn):
    """Turn the library's errors into gradio's message box (one sentence, no stack trace)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import gradio as gr

        try:
            return fn(*args, **kwargs)
        except P2PError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except (OSError, ValueError) as err:  # an unreadable upload, a value gradio let through
            raise gr.Error(f"{type(err).__name__}: {err}", print_exception=False) from None

    return wrapper


class App:
    """The page's work, tab by tab, on one pipeline."""

    def __init__(self, pipe, model: str = "", steps: int = 50):
        from .families import family_of
        from .numbers import MAX_STEPS, check_whole

        self.pipe, self.model = pipe, model
        self.steps = check_whole(steps, "steps", 1, MAX_STEPS)  # the page's starting number of denoising steps
        self.warnings: list[str] = []  # what the page was told besides its results (build() shows them as toasts)
        self.warn = self.warnings.append
        self.joint = family_of(pipe).joint
        self.places = ("joint", "single", "image") if self.joint else ("down", "mid", "up")

    def _generation(self, seed, steps, guidance):
        from .generation import GenerationOptions

        for name, value in (("seed", seed), ("steps", steps)):
            if value is None or float(value) != int(value):
                raise InputError(f"{name} must be a whole number, got {value!r}")
        return GenerationOptions(seed=int(seed), steps=int(steps), guidance=float(guidance))

    def _vocabulary(self, *prompts: str) -> None:
        """Warn, as the command line does, about words the bundled model never learned."""
        from .loading import outside_vocabulary

        message = outside_vocabulary(self.model, prompts)
        if message:
            self.warn(message)

    # -- Maps -------------------------------------------------------------------------------------------------------
    def maps(self, prompt: str, seed=0, steps=50, guidance=7.5, sides: str = "", places=None, heads: str = "",
             step_from: float = 0.0, step_to: float = 1.0, concepts: str = ""):
        """(the generated image, per-word maps [(picture, word)], overlays [(picture, word)], most-attended word
        picture, files, concept maps over the image [(picture, concept)] (empty without concepts))."""
        from . import plot
        from .attend import attend
        from .store import RecordOptions

        if not (prompt or "").strip():
            raise InputError("type a prompt first")
        gen = self._generation(seed, steps, guidance)
        if not 0 <= step_from < step_to <= 1:
            raise InputError(f"the steps to aggregate must satisfy 0 <= from < to <= 1, got {step_from}..{step_to}")
        first, last = math.floor(step_from * gen.steps), max(math.ceil(step_to * gen.steps), 1)
        record = RecordOptions(self_attention=False, steps=(first, last))
        self._vocabulary(prompt)
        named = None
        if _words(concepts):
            from .concepts import ConceptOptions

            named = ConceptOptions(tuple(_words(concepts)), steps=(step_from, step_to))
        result = attend(self.pipe, prompt, gen, record, model=self.model, progress=True, concepts=named)
        chosen = tuple(places) if places else None
        maps = result.maps(res=_sides(sides), places=chosen, heads=tuple(int(h) for h in _words(heads)) or None)
        image = result.images[0]
        tokens = maps.prompts[0]
        words = [w.text for w in tokens.words]
        heat = [maps.word(w) for w in dict.fromkeys(words)]
        gallery = [(m.image(256), m.label) for m in heat]
        overlays = [(m.overlay(image), m.label) for m in heat]
        argmax = plot.argmax_image(maps.argmax().numpy(), {i: f"{i}: {tokens.tokens[i]}"
                                                         for i in tokens.word_positions()})
        folder = Path(tempfile.mkdtemp(prefix="p2p-ui-maps-"))
        saved = maps.save(folder / "maps")
        image.save(folder / "image.png")
        files = [str(saved), str(saved.with_suffix(".json")), str(folder / "image.png")]
        concept_gallery = []
        if named is not None:
            cmaps = result.concept_maps()
            concept_gallery = [(h.overlay(image), h.label) for h in cmaps.all()]
            files.append(str(cmaps.save(folder / "concepts.safetensors")))
        return image, gallery, overlays, argmax, files, concept_gallery

    @property
    def concepts(self) -> bool:
        """Whether the loaded family draws concept maps (an MM-DiT with a concept stream)."""
        from .families import family_of

        return family_of(self.pipe).concepts is not None

    # -- Edit -------------------------------------------------------------------------------------------------------
    def edit_options(self, mode="auto", cross=0.8, self_steps=0.4, per_word="", reweight="", blend="", subtract="",
                     threshold=0.3, blend_start=0.2):
        """EditOptions from the page's controls, parsed as the command line parses its flags."""
        from .edits import EditOptions

        cross_text = f"{float(cross)}" if not (per_word or "").strip() else f"default={float(cross)},{per_word.strip()}"
        return EditOptions.from_text(mode=mode, cross_steps=cross_text, self_steps=str(float(self_steps)),
                                     reweight=_words(reweight), blend=_words(blend), subtract=_words(subtract),
                                     threshold=float(threshold), blend_start=float(blend_start))

    def edit(self, source: str, targets: str, seed=0, steps=50, guidance=7.5, inversion=None, **controls):
        """(grid, vanilla pictures, controlled pictures, blend masks: one (picture, edited prompt) per edit, none
        without a blend). targets: one prompt per line."""
        from . import plot
        from .display import edit_grid
        from .edits import edit

        prompts = [t.strip() for t in (targets or "").splitlines() if t.strip()]
        if not (source or "").strip() or not prompts:
            raise InputError("give a source prompt and at least one edited prompt (one per line)")
        if len(prompts) > MAX_TARGETS:
            raise InputError(f"{len(prompts)} edited prompts were given; at most {MAX_TARGETS} at once are accepted "
                             "(the page runs one generation at a time for everyone)")
        options = self.edit_options(**controls)
        gen = self._generation(seed, steps, guidance)
        self._vocabulary(source, *prompts)
        r = edit(self.pipe, source, prompts, options, gen, vanilla=inversion is None, progress=True,
                 inversion=inversion)
        captions = [source, *prompts]
        vanilla = list(zip(r.vanilla.images, captions)) if r.vanilla else []
        controlled = list(zip(r.controlled.images, captions))
        masks = [] if r.mask is None else [
            (plot.mask_overlay(image, m[0].float().cpu().numpy() > 0.5), caption)
            for image, m, caption in zip(r.controlled.images[1:], r.mask[1:], prompts)]
        return edit_grid(r, inversion=inversion), vanilla, controlled, masks

    def fraction_sweep(self, source: str, target: str, seed=0, steps=50, guidance=7.5,
                       fractions=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), **controls):
        """The edited picture as the cross-attention replacement fraction goes from 0 to 1: [(picture, label)]."""
        from .edits import edit

        target = (target or "").strip().splitlines()[0] if (target or "").strip() else ""
        if not (source or "").strip() or not target:
            raise InputError("give a source prompt and an edited prompt")
        base = self.edit_options(**controls)
        gen = self._generation(seed, steps, guidance)
        out = []
        for f in fractions:
            r = edit(self.pipe, source, target, replace(base, cross_steps=f), gen, vanilla=False, progress=True)
            out.append((r.controlled.images[1], f"{f:.0%} of the steps"))
        return out

    # -- Real image ---------------------------------------------------------------------------------------------------
    def methods(self) -> list[str]:
        """The inversion methods of the loaded family ([] where it has none: the Real image tab is hidden)."""
        from .families import family_of
        from .flow import FLOW_METHODS
        from .inversion import DDIM_METHODS

        family = family_of(self.pipe)
        if not family.invertible:
            return []
        return ["auto", *(FLOW_METHODS if family.flow else DDIM_METHODS)]

    def invert(self, path, caption: str, method: str = "auto", steps=50, guidance=7.5):
        """(reconstruction, message, inversion) of an uploaded image; the inversion is kept for further edits."""
        from .inversion import InversionOptions, autoencoder_reconstruction, invert, psnr, sample_back

        image = check_upload(path)
        if not (caption or "").strip():
            raise InputError("give a caption of the image (it becomes the source prompt of edits)")
        options = InversionOptions(method=method, steps=int(steps), guidance=float(guidance))
        self._vocabulary(caption)
        inv = invert(self.pipe, image, caption, options, progress=True, model=self.model)
        rec = sample_back(self.pipe, inv).images[0]
        ae = autoencoder_reconstruction(self.pipe, inv.image)
        message = (f"{inv.options.method} inversion in {inv.settings['seconds']:.1f} s: reconstruction PSNR "
                   f"{psnr(rec, inv.image):.2f} dB against the input, {psnr(rec, ae):.2f} dB against the "
                   "autoencoder's own reconstruction. Edit it below; the inversion is kept.")
        return rec, message, inv

    def edit_real(self, inversion, targets: str, **controls):
        if inversion is None:
            raise InputError("invert an image first")
        grid, _, controlled, masks = self.edit(inversion.prompt, targets, inversion=inversion, **controls)
        return grid, controlled, masks

    # -- Why ----------------------------------------------------------------------------------------------------------
    def why(self, source: str, target: str, seed=0, steps=50, guidance=7.5):
        """(most-attended word at step 0 for each prompt, the drift plot, the numbers in a sentence)."""
        from .analysis import swap_analysis
        from .display import swap_figures

        if not (source or "").strip() or not (target or "").strip():
            raise InputError("give a source prompt and a prompt with one word swapped")
        self._vocabulary(source, target)
        result = swap_analysis(self.pipe, source, target, self._generation(seed, steps, guidance), progress=True)
        pictures = swap_figures(result)
        text = (f"At the first step {result.argmax_changed:.1%} of the pixels change their most-attended word. "
                f"Final latent drift from the source: {result.drift_vanilla[-1]:.3f} without control, "
                f"{result.drift_controlled[-1]:.3f} with Prompt-to-Prompt.")
        return pictures["argmax_step0_0"], pictures["argmax_step0_1"], pictures["drift"], pictures["images"], text


def build(app: App):
    """The page: four tabs, each control with a label and a help text."""
    import gradio as gr

    app.warn = lambda message: gr.Warning(message)  # a toast on the page, beside the results
    progress = gr.Progress(track_tqdm=True)

    def steps_box():
        return gr.Slider(1, max(100, app.steps), value=app.steps, step=1, label="steps", info="denoising steps")

    def common():
        with gr.Row():
            seed = gr.Number(value=2, precision=0, label="seed", info="the same seed gives the same picture")
            steps = steps_box()
            guidance = gr.Slider(1, 15, value=7.5, step=0.5, label="guidance",
                                 info="classifier-free guidance scale")
        return seed, steps, guidance

    def edit_controls(prefix: str):
        with gr.Accordion("edit settings", open=True):
            with gr.Row():
                mode = gr.Dropdown(["auto", "replace", "refine", "reweight"], value="auto", label="mode",
                                   info="replace: a word swapped; refine: words added; reweight: words scaled; "
                                        "auto: replace if the word counts match")
                cross = gr.Slider(0, 1, value=0.8, step=0.05, label="cross-attention steps",
                                  info="fraction of the steps whose cross-attention is the source's")
                self_steps = gr.Slider(0, 1, value=0.4, step=0.05, label="self-attention steps",
                                       info="fraction of the steps whose self-attention is the source's")
            with gr.Row():
                per_word = gr.Textbox(label="per-word schedule", placeholder="triangle=0.4",
                                      info="word=fraction (or word=start:end), comma-separated; others use the slider")
                reweight = gr.Textbox(label="re-weight", placeholder="blue=2 red=-1",
                                      info="word=factor: scale a word's attention (negative allowed)")
            with gr.Row():
                blend = gr.Textbox(label="blend words", placeholder="square triangle", elem_id=f"{prefix}-blend",
                                   info="local blend: words whose attention marks what may change")
                subtract = gr.Textbox(label="subtract words", info="local blend: words whose region must not change")
                threshold = gr.Slider(0.05, 0.95, value=0.3, step=0.05, label="threshold",
                                      info="local-blend mask threshold")
                blend_start = gr.Slider(0, 1, value=0.2, step=0.05, label="blend start",
                                        info="fraction of the steps before blending starts")
        return [mode, cross, self_steps, per_word, reweight, blend, subtract, threshold, blend_start]

    names = ["mode", "cross", "self_steps", "per_word", "reweight", "blend", "subtract", "threshold", "blend_start"]

    with gr.Blocks(title=f"prompt2prompt — {app.model}") as page:
        gr.Markdown(f"# prompt2prompt on `{app.model}`\nAttention maps, Prompt-to-Prompt edits, real images. "
                    "One generation at a time; errors appear as a message.")
        with gr.Tab("Maps"):
            prompt = gr.Textbox(value="a red circle and a blue square", label="prompt", elem_id="maps-prompt",
                                info="the words' maps are drawn below, one per word")
            seed, steps, guidance = common()
            with gr.Row():
                sides = gr.Textbox(label="map sides", placeholder="8 16", info="resolutions to average (empty: all)")
                places = gr.CheckboxGroup(list(app.places), label="places", info="parts of the network (none: all)")
                heads = gr.Textbox(label="heads", placeholder="0 1", info="attention heads to average (empty: all)")
                step_from = gr.Slider(0, 1, value=0, step=0.05, label="from step", info="fraction of the loop")
                step_to = gr.Slider(0, 1, value=1, step=0.05, label="to step", info="fraction of the loop")
            concepts = gr.Textbox(label="concepts", placeholder="circle square background", visible=app.concepts,
                                  elem_id="maps-concepts", info="words whose concept maps to draw too "
                                  "(ConceptAttention: each one's share of every pixel; the image is unchanged)")
            run = gr.Button("Draw maps", variant="primary", elem_id="maps-run")
            picture = gr.Image(label="the generated image", type="pil", elem_id="maps-image", height=256)
            gallery = gr.Gallery(label="per-word maps", columns=6, elem_id="maps-gallery", type="pil")
            overlays = gr.Gallery(label="overlaid on the image", columns=6, type="pil")
            argmax = gr.Image(label="most-attended word per pixel", type="pil")
            files = gr.File(label="download: maps.safetensors, maps.json, image.png", file_count="multiple")
            concept_maps = gr.Gallery(label="concept maps over the image", columns=6, type="pil",
                                      visible=app.concepts, elem_id="maps-concept-maps")

            def do_maps(p, s, n, g, sd, pl, hd, a, b, c, _progress=progress):
                return app.maps(p, s, n, g, sd, pl, hd, a, b, c)

            run.click(user_errors(do_maps), [prompt, seed, steps, guidance, sides, places, heads, step_from, step_to,
                                             concepts], [picture, gallery, overlays, argmax, files, concept_maps])

        with gr.Tab("Edit"):
            source = gr.Textbox(value="a red circle and a blue square", label="source prompt", elem_id="edit-source",
                                info="the prompt whose attention the edits reuse")
            targets = gr.Textbox(value="a red circle and a blue triangle", label="edited prompts", lines=2,
                                 elem_id="edit-targets", info="one per line")
            seed_e, steps_e, guidance_e = common()
            controls = edit_controls("edit")
            with gr.Row():
                run_e = gr.Button("Edit", variant="primary", elem_id="edit-run")
                sweep = gr.Button("Sweep the replacement fraction 0..1", elem_id="edit-sweep")
            grid = gr.Image(label="vanilla (top) and controlled (bottom)", type="pil", elem_id="edit-grid")
            vanilla = gr.Gallery(label="vanilla: same seed, no control", columns=4, elem_id="edit-vanilla", type="pil")
            controlled = gr.Gallery(label="Prompt-to-Prompt", columns=4, elem_id="edit-controlled", type="pil")
            mask = gr.Gallery(label="local-blend mask of each edit (greyed: kept)", columns=4, type="pil",
                              elem_id="edit-masks")
            fractions = gr.Gallery(label="replacement fraction sweep", columns=6, type="pil", elem_id="edit-fractions")

            def do_edit(src, tg, s, n, g, *c, _progress=progress):
                return app.edit(src, tg, s, n, g, **dict(zip(names, c)))

            def do_sweep(src, tg, s, n, g, *c, _progress=progress):
                return app.fraction_sweep(src, tg, s, n, g, **dict(zip(names, c)))

            run_e.click(user_errors(do_edit), [source, targets, seed_e, steps_e, guidance_e, *controls],
                        [grid, vanilla, controlled, mask])
            sweep.click(user_errors(do_sweep), [source, targets, seed_e, steps_e, guidance_e, *controls], fractions)

        with gr.Tab("Real image", visible=bool(app.methods())):  # only where the family can invert
            state = gr.State(None)
            with gr.Row():
                # a file, not gr.Image: gradio would decode the upload before the limits are checked
                upload = gr.File(file_types=["image"], type="filepath", label="image", elem_id="real-upload",
                                 height=256)
                reconstruction = gr.Image(label="reconstruction from the inversion", type="pil", elem_id="real-rec",
                                          height=256)
            caption = gr.Textbox(label="caption of the image", value="a red circle and a blue square",
                                 elem_id="real-caption", info="becomes the source prompt of edits")
            with gr.Row():
                method = gr.Dropdown(app.methods() or ["auto"], value="auto", label="inversion method",
                                     info="auto: null-text (UNet models) or FireFlow (flow models)")
                steps_r = steps_box()
                guidance_r = gr.Slider(1, 15, value=2.0 if app.joint else 7.5, step=0.5, label="guidance",
                                       info="the guidance the edits will use (flow models invert at small guidance)")
            run_i = gr.Button("Invert", variant="primary", elem_id="real-invert")
            message = gr.Markdown(elem_id="real-message")
            targets_r = gr.Textbox(label="edited caption", value="a red circle and a blue triangle",
                                   elem_id="real-target", info="one per line")
            controls_r = edit_controls("real")
            run_r = gr.Button("Edit the image", variant="primary", elem_id="real-edit")
            grid_r = gr.Image(label="the edit", type="pil", elem_id="real-grid")
            controlled_r = gr.Gallery(label="edited", columns=4, type="pil")
            mask_r = gr.Gallery(label="local-blend mask of each edit (greyed: the input's pixels)", columns=4,
                                type="pil", elem_id="real-masks")

            def do_invert(p, c, m, n, g, _progress=progress):
                return app.invert(p, c, m, n, g)

            def do_edit_real(inv, tg, *c, _progress=progress):
                return app.edit_real(inv, tg, **dict(zip(names, c)))

            run_i.click(user_errors(do_invert), [upload, caption, method, steps_r, guidance_r],
                        [reconstruction, message, state])
            run_r.click(user_errors(do_edit_real), [state, targets_r, *controls_r], [grid_r, controlled_r, mask_r])

        with gr.Tab("Why"):
            gr.Markdown("Why one swapped word moves the whole picture: the most-attended word of each pixel at the "
                        "first step, before and after the swap, and how far the latents drift without and with "
                        "attention control.")
            source_w = gr.Textbox(value="a red circle and a blue square", label="source prompt",
                                  info="generated with and without attention control from the same seed")
            target_w = gr.Textbox(value="a red circle and a blue triangle", label="one word swapped",
                                  info="the source with one word changed", elem_id="why-target")
            seed_w, steps_w, guidance_w = common()
            run_w = gr.Button("Analyse", variant="primary", elem_id="why-run")
            with gr.Row():
                before = gr.Image(label="source: most-attended word, step 0", type="pil")
                after = gr.Image(label="swapped: most-attended word, step 0", type="pil")
            drift = gr.Image(label="latent drift", type="pil")
            pictures = gr.Image(label="vanilla and controlled pictures", type="pil")
            summary = gr.Markdown(elem_id="why-summary")

            def do_why(a, b, s, n, g, _progress=progress):
                return app.why(a, b, s, n, g)

            run_w.click(user_errors(do_why), [source_w, target_w, seed_w, steps_w, guidance_w],
                        [before, after, drift, pictures, summary])
    return page.queue(default_concurrency_limit=1)


def serve(model: str = "shapes", host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          device=None, block: bool = True, dtype=None, offload: str | None = None, steps: int = 50):
    """Load the model (dtype: a torch dtype, default float32; offload: see `loading.load_pipeline`), build the page
    with `steps` as its starting number of denoising steps and start it; returns the gradio app (for tests, with
    block=False)."""
    import os

    import torch

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from .loading import load_pipeline

    check_address(host, port)  # before the model loads
    from .numbers import MAX_STEPS, check_whole

    check_whole(steps, "steps", 1, MAX_STEPS)  # before the model loads
    pipe = load_pipeline(model, device=device or "cpu", dtype=dtype or torch.float32, offload=offload)
    page = build(App(pipe, model, steps))
    page.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD_BYTES,
                prevent_thread_lock=not block, quiet=not block, show_error=False)
    return page
