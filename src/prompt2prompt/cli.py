"""`p2p`: a thin command line over the library. Every subcommand writes pictures, JSON and an index.html.

Every input is checked before any work (numbers, device, destination, image, words): a bad one ends the command with
exit status 2 and one sentence saying what was expected and what was given; Ctrl-C ends it with status 130. Output
folders are written whole or not at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import argtypes
from .argtypes import number, whole
from .errors import InputError, P2PError
from .loading import DEFAULT_MODEL
from .numbers import MAX_STEPS


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage block): what was wrong, and where the options are listed."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


# -- flags every command shares ------------------------------------------------------------------------------------
def _machine(p: argparse.ArgumentParser, out: str, out_is: str = "output folder") -> None:
    """The flags every command has: model, device, precision, output, quietness."""
    p.add_argument("--model", default=None,
                   help=f"bundled model name, local diffusers folder, or cached hub id (default: {DEFAULT_MODEL}; "
                   "with `p2p edit --from`, the model the inversion was made with)")
    p.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:N or mps (default: cuda if "
                   "available, else cpu)")
    _precision(p)
    p.add_argument("--out", default=out, help=f"{out_is} (default: {out}); a folder is replaced whole, and one "
                   "holding files p2p did not write is refused" if out_is == "output folder" else
                   f"{out_is} (default: {out})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _precision(p: argparse.ArgumentParser) -> None:
    """--dtype (and --fp16, its old spelling) and --offload."""
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="precision of the weights and the computation: fp32, fp16 (GPU only) or bf16 (SD3's and "
                   "Flux's native precision; also on the CPU); maps and blend masks are summed in fp32 whatever it is "
                   "(default: fp32)")
    p.add_argument("--fp16", action="store_true", help="the same as --dtype fp16")
    p.add_argument("--offload", default=None, choices=["model", "sequential"],
                   help="keep weights on the CPU and move them to the GPU as they run: model (each component; "
                   "diffusers' enable_model_cpu_offload) or sequential (each layer: least memory, slowest); needs a "
                   "GPU device (default: none)")


PIPELINE_DEFAULT = "the pipeline's own: 50 on SD 1.x / 2.x / XL, 28 on SD3 and Flux.1"
GUIDANCE_DEFAULT = "the pipeline's own: 7.5 on SD 1.x / 2.x, 5 on SDXL, 7 on SD3, 3.5 on Flux.1"


def _sampling(p: argparse.ArgumentParser, seed: bool = True, guidance: float | None = None,
              guidance_default: str = GUIDANCE_DEFAULT, steps_default: str = PIPELINE_DEFAULT) -> None:
    if seed:
        p.add_argument("--seed", type=argtypes.seed(), default=None,
                       help="seed of the shared initial latent and of the scheduler's noise (default: 0)")
    p.add_argument("--steps", type=argtypes.steps(), default=None,
                   help=f"denoising steps, at most {MAX_STEPS} (default: {steps_default})")
    p.add_argument("--guidance", type=number(0), default=guidance,
                   help=f"classifier-free guidance scale; 1 or less turns it off (default: {guidance_default})")
    p.add_argument("--height", type=whole(1), default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=whole(1), default=None, help="image width in pixels (default: the model's)")


def _common(p: argparse.ArgumentParser, out: str, out_is: str = "output folder",
            steps_default: str = PIPELINE_DEFAULT) -> None:
    """_machine's flags and the generation settings."""
    _machine(p, out, out_is)
    _sampling(p, steps_default=steps_default)


def _options(args):
    from .generation import GenerationOptions

    return GenerationOptions(steps=args.steps, guidance=args.guidance, seed=0 if args.seed is None else args.seed,
                             height=args.height, width=args.width)


def _prompts(*prompts: str) -> None:
    for prompt in prompts:
        if not prompt.strip():
            raise P2PError(f"expected a prompt with at least one word, got {prompt!r}")


def _warn_truncated(pipe, prompts, quiet: bool, model: str | None = None) -> None:
    """Say where a prompt longer than the text encoder's limit is cut (the model never sees the rest), and, on a
    bundled model, which words it never saw in training."""
    from .loading import outside_vocabulary
    from .tokens import prompt_tokens

    unknown = outside_vocabulary(model, prompts)
    if unknown:
        print(f"p2p: warning: {unknown}", file=sys.stderr)
    for prompt in prompts:
        tokens = prompt_tokens(pipe, prompt)
        cut = tokens.truncated
        if cut:
            print(f"p2p: warning: the prompt is longer than the model's {tokens.limit()}; "
                  f"it is cut before {cut[:60]!r}{'...' if len(cut) > 60 else ''}", file=sys.stderr)


def _device(args):
    """(device, dtype, offload), checked before anything is loaded."""
    from .loading import check_offload, resolve_device, resolve_dtype

    if args.fp16 and args.dtype not in (None, "fp16"):
        raise P2PError(f"--fp16 is --dtype fp16, but --dtype {args.dtype} was given too: give one of them")
    device = resolve_device(args.device)
    dtype = resolve_dtype("fp16" if args.fp16 else args.dtype or "fp32", device)
    check_offload(args.offload, device)
    return device, dtype, args.offload


def _pipe(args, device):
    import diffusers
    import transformers

    from .loading import load_pipeline

    # library notices (torchvision fallbacks, weight-loading bars) are noise for a CLI user
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()
    if not args.quiet:
        print(f"loading {args.model} on {device[0]}", file=sys.stderr)
    return load_pipeline(args.model, device=device[0], dtype=device[1], offload=device[2], progress=not args.quiet)


def _recorded(model: str) -> str:
    """A model as a file records it for later commands: a local folder by its absolute path (so the file works from
    any folder), a bundled name or hub id as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def _folder(args) -> None:
    from .outputs import check_output_folder

    check_output_folder(args.out)


# -- commands --------------------------------------------------------------------------------------------------------
def cmd_attend(args) -> None:
    from .attend import attend
    from .figures import write_attend
    from .store import RecordOptions

    _prompts(args.prompt)
    if args.concept_blocks and not args.concepts:
        raise InputError("--concept-blocks chooses where concept maps are read: expected it with --concepts WORD ...")
    concepts = None
    if args.concepts:
        from .concepts import ConceptOptions

        concepts = ConceptOptions(tuple(args.concepts), tuple(args.concept_blocks) if args.concept_blocks else None)
    if args.image is not None or args.noise is not None:
        _attend_image(args, concepts)
        return
    components = 6 if args.components is None else args.components
    options, device = _options(args), _device(args)
    _folder(args)
    pipe = _pipe(args, device)
    _warn_truncated(pipe, [args.prompt], args.quiet, args.model)
    record = RecordOptions(self_attention=components > 0)
    res = tuple(args.res) if args.res else None
    result = attend(pipe, args.prompt, options, record, model=args.model, progress=not args.quiet, res=res,
                    concepts=concepts)
    files = write_attend(result, args.out, res=res, components=components)
    print(f"wrote {len(files)} files to {args.out}; open {files['html']}")


def _attend_image(args, concepts) -> None:
    """`p2p attend CAPTION --image IMG --concepts ...`: concept maps of an existing image (one step of it noised)."""
    from .concepts import DEFAULT_NOISE, image_concepts
    from .figures import write_image_concepts
    from .images import read_image

    if args.image is None:
        raise InputError("--noise is the noise level an input image is read at: expected it with --image IMG")
    if concepts is None:
        raise InputError("--image reads concept maps of an image: expected --concepts WORD ... with it")
    unused = [flag for flag, value in (("--steps", args.steps), ("--guidance", args.guidance), ("--res", args.res),
                                       ("--components", args.components)) if value is not None]
    if unused:
        raise InputError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} nothing with --image (one "
                         "step of the noised image, without guidance, gives concept maps only): leave "
                         f"{'it' if len(unused) == 1 else 'them'} out")
    read_image(args.image)  # an image that cannot be read is refused before the model loads
    device = _device(args)
    _folder(args)
    pipe = _pipe(args, device)
    _warn_truncated(pipe, [args.prompt], args.quiet, args.model)
    result = image_concepts(pipe, args.image, args.prompt, concepts, DEFAULT_NOISE if args.noise is None else
                            args.noise, 0 if args.seed is None else args.seed, args.height, args.width,
                            model=args.model)
    files = write_image_concepts(result, args.out)
    print(f"wrote {len(files)} files to {args.out}; open {files['html']}")


def _edit_options(args):
    """The edit's options from its flags; a flag left out (None) takes EditOptions' own default."""
    from .edits import EditOptions

    given = {k: getattr(args, k) for k in ("mode", "cross_steps", "self_steps", "pooled", "joint")
             if getattr(args, k) is not None}
    return EditOptions.from_text(
        **given, reweight=args.reweight or (), blend=args.blend or (), subtract=args.subtract or (),
        reference=args.reference, blend_start=args.blend_start, threshold=args.threshold,
        keep_background=getattr(args, "keep_background", True), feather=getattr(args, "feather", None),
        self_max_side=getattr(args, "self_max_side", None))


def _given(args, flags: dict) -> list[str]:
    """The flags of `flags` ({flag: attribute}) given on this command line (their attribute is not None)."""
    return [flag for flag, attr in flags.items() if getattr(args, attr, None) not in (None, False)]


def _refuse_joint_on_unet(args, pipe) -> None:
    """--joint given at all (even its default) on a UNet model: it would change nothing."""
    from .edits import joint_refusal
    from .families import family_of

    if getattr(args, "joint", None) is not None and not family_of(pipe).joint:
        raise P2PError(joint_refusal(family_of(pipe)))


def _edit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default=None, choices=["auto", "replace", "refine", "reweight"],
                   help="replace: word swap (same number of words); refine: added words (token alignment); "
                   "reweight: same prompt, re-weighted words (needs --reweight); auto: replace if the word counts "
                   "match, else refine (default: auto)")
    p.add_argument("--cross-steps", default=None,
                   help="fraction of the denoising loop whose cross-attention comes from the source: 0.8, a pair "
                   "0.1,0.8, or per word default=1.0,lion=0.4 (pairs per word as lion=0.1:0.4) (default: 0.8)")
    p.add_argument("--self-steps", default=None,
                   help="fraction (or pair) of the loop whose self-attention comes from the source (default: 0.4)")
    p.add_argument("--self-max-side", type=whole(1), default=None, metavar="PX",
                   help="replace self-attention only at maps this many positions a side or fewer (default: a "
                   "quarter of the latent's side, as the p2p notebooks: 16 at SD's 64x64 latents; 4 on shapes' "
                   "16x16, its middle block only, where 16 makes refine keep more layout: BENCHMARKS.md)")
    p.add_argument("--reweight", nargs="+", metavar="WORD=FACTOR",
                   help="scale words' cross-attention by a finite factor, e.g. circle=2 red=-1")
    p.add_argument("--blend", nargs="+", metavar="WORD",
                   help="local blend: words whose attention marks the region allowed to change (in any prompt; with "
                   "--reference, one per prompt, source first)")
    p.add_argument("--subtract", nargs="+", metavar="WORD", help="local blend: words whose region must not change")
    p.add_argument("--joint", default=None, choices=["raw", "renormalize"],
                   help="MM-DiT (SD3, Flux): a replaced image-to-text block enters the joint softmax as the source's "
                   "(raw), or rescaled to the edited prompt's own total text attention (renormalize) (default: raw)")
    p.add_argument("--threshold", type=number(0, 1, open_low=True, open_high=True), default=0.3,
                   help="local blend mask threshold, between 0 and 1 (default: 0.3)")
    p.add_argument("--blend-start", type=number(0, 1), default=None,
                   help="fraction of the loop before local blending starts, 0 to 1 (default: 0.2; with --reference "
                   "the notebook's; with --from-image 0, of FlowEdit's walked steps)")
    p.add_argument("--pooled", default=None, choices=["own", "source"],
                   help="SDXL and SD3: each prompt's own pooled text embedding, or the source's for every prompt "
                   "(default: own)")
    p.add_argument("--reference", nargs="?", const="stable", default=None, choices=["stable", "null-text"],
                   help="reproduce the Prompt-to-Prompt code's edits exactly, as its stable (default) or null-text "
                   "notebook computes them (docs/how-it-works.md: reference mode)")


def _flowedit(args) -> None:
    """`p2p edit --from-image IMAGE SOURCE TARGET`: FlowEdit, checked before the model loads."""
    from .figures import write_flowedit
    from .flowedit import FlowEditOptions, flowedit
    from .images import read_image

    if len(args.targets) != 1:
        raise P2PError(f"--from-image edits one image from its caption to one target: expected SOURCE TARGET, got "
                       f"{1 + len(args.targets)} prompt(s)")
    _prompts(args.source, *args.targets)
    controls = _given(args, {"--from": "from_inversion", "--reweight": "reweight", "--reference": "reference",
                             "--feather": "feather", "--mode": "mode", "--cross-steps": "cross_steps",
                             "--self-steps": "self_steps", "--self-max-side": "self_max_side", "--joint": "joint",
                             "--pooled": "pooled", "--guidance": "guidance"})
    controls += [] if args.keep_background else ["--no-keep-background"]
    if controls:
        raise P2PError(f"--from-image (FlowEdit) takes no {', '.join(controls)}: FlowEdit moves the whole image, "
                       "optionally kept to a local blend's mask (--blend), guided by --source-guidance and "
                       "--target-guidance; use --from INVERSION for a Prompt-to-Prompt edit of an inverted image")
    options = FlowEditOptions(steps=args.steps, n_max=args.n_max, n_avg=1 if args.n_avg is None else args.n_avg,
                              source_guidance=args.source_guidance, target_guidance=args.target_guidance,
                              seed=0 if args.seed is None else args.seed, height=args.height, width=args.width,
                              blend=tuple(args.blend or ()),
                              subtract=tuple(args.subtract or ()), threshold=args.threshold,
                              blend_start=0.0 if args.blend_start is None else args.blend_start)
    device = _device(args)
    _folder(args)
    image = read_image(args.from_image)  # before the model loads: a missing or unreadable image fails at once
    pipe = _pipe(args, device)
    _warn_truncated(pipe, [args.source, *args.targets], args.quiet, args.model)
    result = flowedit(pipe, image, args.source, args.targets[0], options, progress=not args.quiet)
    files = write_flowedit(result, args.out, model=args.model)
    print(f"wrote {len(files)} files to {args.out}; open {files['html']}")


def cmd_edit(args) -> None:
    from .edits import edit
    from .figures import write_edit
    from .inversion import Inversion, check_inversion, inversion_model

    if args.from_image:
        return _flowedit(args)
    flowedit_only = _given(args, {"--n-max": "n_max", "--n-avg": "n_avg", "--source-guidance": "source_guidance",
                                  "--target-guidance": "target_guidance"})
    if flowedit_only:
        raise P2PError(f"{', '.join(flowedit_only)} set FlowEdit, which runs with --from-image IMAGE; without it "
                       "they would change nothing")
    if args.from_inversion:
        sampling = _given(args, {"--steps": "steps", "--guidance": "guidance", "--height": "height",
                                 "--width": "width", "--seed": "seed"})
        if sampling:
            raise P2PError(f"--from INVERSION samples with the inversion's own steps, guidance and size, from its "
                           f"inverted latent (no seed): leave out {', '.join(sampling)}, or invert again with them")
    if not args.targets:  # re-weighting the prompt itself: the edited prompt is the source
        if not (args.reweight or args.mode == "reweight"):
            raise P2PError("expected one or more edited prompts after the source prompt, or --reweight WORD=FACTOR to "
                           "re-weight the source prompt itself")
        args.targets = [args.source]
        args.mode = "reweight"
    _prompts(args.source, *args.targets)
    if (args.feather is not None or not args.keep_background) and not (args.from_inversion and args.blend):
        flag = "--feather" if args.feather is not None else "--no-keep-background"
        raise P2PError(f"{flag} applies to a real image's edit with a local blend; expected --from INVERSION and "
                       f"--blend WORD with it, got {'no --from' if not args.from_inversion else 'no --blend'}")
    options, generation, device = _edit_options(args), _options(args), _device(args)
    _folder(args)
    inversion = Inversion.load(args.from_inversion) if args.from_inversion else None
    if inversion is not None:
        check_inversion(None, inversion, args.source)  # the caption, before the model loads
        if args.model is None:  # the file records its model: that is the default
            args.model = inversion_model(inversion)
    pipe = _pipe(args, device)
    _refuse_joint_on_unet(args, pipe)
    if inversion is not None:
        check_inversion(pipe, inversion, args.source)
    _warn_truncated(pipe, [args.source, *args.targets], args.quiet, args.model)
    result = edit(pipe, args.source, args.targets, options, generation, vanilla=True, progress=not args.quiet,
                  inversion=inversion)
    files = write_edit(result, args.out, model=args.model, inversion=inversion)
    print(f"wrote {len(files)} files to {args.out}; open {files['html']}")


def cmd_invert(args) -> None:
    from .images import read_image
    from .inversion import InversionOptions, autoencoder_reconstruction, invert, psnr, sample_back
    from .loading import samples_by_flow
    from .outputs import check_output_file, png_info, png_owned, staged_file

    _prompts(args.caption)
    method = args.method
    if method == "auto":  # decided from the model's index before loading it, so options are checked at once
        method = "fireflow" if samples_by_flow(args.model) else "null-text"
    options = InversionOptions(method=method, steps=50 if args.steps is None else args.steps, guidance=args.guidance,
                               inner_steps=args.inner_steps, offsets=tuple(args.offsets), height=args.height,
                               width=args.width)
    device = _device(args)
    from .inversion import is_inversion_file

    # the file and its reconstruction beside it: new, or written by p2p (an inversion file, a p2p picture), and never
    # a link; both refused here, before any work
    if Path(args.out).expanduser().is_dir():
        raise InputError(f"--out {args.out} is a folder; expected a file name such as inversion.safetensors")
    name = args.out if args.out.endswith(".safetensors") else args.out + ".safetensors"
    path = check_output_file(name, owned=is_inversion_file)
    rec_path = check_output_file(path.with_name(path.stem + "_reconstruction.png"), owned=png_owned,
                                 what="the reconstruction")
    image = read_image(args.image)  # before the model loads: a missing or unreadable image fails at once
    pipe = _pipe(args, device)
    _warn_truncated(pipe, [args.caption], args.quiet, args.model)
    inv = invert(pipe, image, args.caption, options, progress=not args.quiet, model=_recorded(args.model))
    for note in inv.settings["conversions"]:
        print(f"p2p invert: {note}", file=sys.stderr)
    rec = sample_back(pipe, inv, progress=not args.quiet).images[0]
    ae = autoencoder_reconstruction(pipe, inv.image)
    inv.settings.update(psnr_vs_input=psnr(rec, inv.image), psnr_vs_autoencoder=psnr(rec, ae))
    # both written to fresh temporary files beside them and renamed at the end: whole, or not at all
    with staged_file(path) as f, staged_file(rec_path) as r:
        f.write(inv.to_bytes())
        rec.save(r, format="PNG", pnginfo=png_info())
    print(f"{inv.options.method} inversion in {inv.settings['seconds']:.1f} s: reconstruction PSNR "
          f"{inv.settings['psnr_vs_input']:.2f} dB against the input, {inv.settings['psnr_vs_autoencoder']:.2f} dB "
          f"against the autoencoder's own reconstruction")
    print(f"wrote {path} and {rec_path}; edit with: p2p edit --from {path} \"{args.caption}\" \"EDITED CAPTION\"")


def cmd_sweep(args) -> None:
    import torch

    from .numbers import check_memory, check_processes, check_threads
    from .study import load
    from .sweep import launch, run_from_args

    check_threads(args.threads)  # the machine's limits, before the study is read
    check_processes(args.processes, args.threads, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    study = load(args.study)  # a bad study is refused here, before any process starts
    if args.processes > 1:
        from .loading import resolve

        folder = resolve(study.model)  # a missing model too, before the processes start
        if not torch.cuda.is_available():
            check_memory(args.processes, folder)
        extra = [*(["--threads", str(args.threads)] if args.threads else []),
                 *(["--retry-failed"] if args.retry_failed else []), *(["--quiet"] if args.quiet else []),
                 *(["--offload", args.offload] if args.offload else [])]
        code = launch(args.study, args.out, args.processes, extra)
        if code:
            raise InputError(f"the sweep's processes stopped with exit code {code} (their messages are above); run "
                             "the same command again to continue")
    else:
        run_from_args(args, study)


def cmd_ui(args) -> None:
    from .loading import resolve
    from .ui import check_address, serve

    device, dtype, offload = _device(args)
    check_address(args.host, args.port)  # a busy port or a foreign address, before the model loads
    try:  # after the flags: a wrong flag is reported whether or not gradio is installed
        import gradio  # noqa: F401
    except ImportError:
        raise P2PError("p2p ui needs gradio: pip install -e '.[ui]'") from None
    resolve(args.model)  # a missing model is refused before the server starts
    print(f"p2p ui: http://{args.host}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
    serve(args.model, args.host, args.port, args.share, device, dtype=dtype, offload=offload, steps=args.steps)


def cmd_swap(args) -> None:
    from .analysis import swap_analysis
    from .figures import write_swap

    _prompts(args.source, args.target)
    options, generation, device = _edit_options(args), _options(args), _device(args)
    _folder(args)
    pipe = _pipe(args, device)
    _refuse_joint_on_unet(args, pipe)
    _warn_truncated(pipe, [args.source, args.target], args.quiet, args.model)
    result = swap_analysis(pipe, args.source, args.target, generation, options, progress=not args.quiet)
    files = write_swap(result, args.out, model=args.model)
    print(f"first step: {result.argmax_changed:.1%} of pixels change their most-attended word; final latent drift "
          f"vanilla {result.drift_vanilla[-1]:.3f} vs controlled {result.drift_controlled[-1]:.3f}")
    print(f"wrote {len(files)} files to {args.out}; open {files['html']}")


def cmd_demo(args) -> None:
    from dataclasses import replace

    from .demo import DemoOptions, quick_options, run_demo

    options = quick_options() if args.quick else DemoOptions()
    given = (("steps", args.steps), ("pairs", args.pairs), ("guidance", args.guidance), ("seed", args.seed))
    options = replace(options, **{k: v for k, v in given if v is not None})
    device = _device(args)
    _folder(args)
    pipe = _pipe(args, device)
    run_demo(pipe, args.out, options, model=args.model, quiet=args.quiet)
    print(f"wrote {args.out}; open {args.out}/index.html")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="p2p", description="Look inside Stable Diffusion's attention and edit "
                                     "images by controlling it (Prompt-to-Prompt).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("attend", help="generate an image and write its cross-/self-attention maps",
                       description="Generate an image and write per-token cross-attention maps, overlays, the "
                       "most-attended token per pixel, self-attention components, the maps as safetensors + JSON, "
                       "and a self-contained index.html.")
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--res", type=whole(1), nargs="+", default=None,
                   help="map sides to aggregate (e.g. 16, or 16 32); default: every recorded resolution, upsampled "
                   "to the largest")
    p.add_argument("--components", type=whole(0), default=None,
                   help="self-attention principal components to draw; 0 records no self-attention (default: 6)")
    p.add_argument("--concepts", nargs="+", default=None, metavar="WORD",
                   help="MM-DiTs: also draw these concepts' maps (ConceptAttention: each word's share of every "
                   "image token, read in the joint attention's output space; the image is unchanged), e.g. "
                   "--concepts circle square background")
    p.add_argument("--concept-blocks", type=whole(0), nargs="+", default=None, metavar="N",
                   help="with --concepts: the joint blocks whose maps are averaged, counted from 0 (default: Flux.1's "
                   "last 4, the ConceptAttention code's default there; every block on the other families)")
    p.add_argument("--image", default=None, metavar="IMG",
                   help="with --concepts: the concept maps of this image (PROMPT its caption) instead of a generated "
                   "one: its latent noised to --noise, one step of the model, no guidance")
    p.add_argument("--noise", type=number(0.0, 1.0, open_low=True, open_high=True), default=None, metavar="LEVEL",
                   help="with --image: the noise level it is read at, between 0 and 1 (default: 0.5)")
    _common(p, "p2p-out/attend")
    p.set_defaults(func=cmd_attend)

    p = sub.add_parser("edit", help="Prompt-to-Prompt edit: vanilla row versus attention-controlled row",
                       description="Generate the source and edited prompts from one seed, without control (vanilla) "
                       "and with Prompt-to-Prompt attention control; write a labelled grid, each image, the settings "
                       "as JSON and an HTML page.")
    p.add_argument("source", help="the source prompt")
    p.add_argument("targets", nargs="*", help="one or more edited prompts (none with --reweight: the source "
                   "prompt re-weighted)")
    p.add_argument("--from", dest="from_inversion", default=None, metavar="INVERSION",
                   help="edit a real image: an inversion file from `p2p invert` (its caption must be the source; "
                   "its steps and guidance are used)")
    p.add_argument("--keep-background", action=argparse.BooleanOptionalAction, default=True,
                   help="with --from and --blend: each edited image is the input image outside its blend mask (the "
                   "input's own pixels; the autoencoder's decode would shift them); --no-keep-background shows the "
                   "decoded pixels instead (default: keep)")
    p.add_argument("--feather", type=whole(0), default=None, metavar="PX",
                   help="with --keep-background: pixels outside the mask over which the edit fades into the input, "
                   "at most 64 (default: the autoencoder's factor, 8 on SD)")
    p.add_argument("--from-image", default=None, metavar="IMAGE",
                   help="edit a real image without inverting it: FlowEdit (Kulikov et al. 2024) on SD3 / Flux; the "
                   "source prompt is its caption, one target; no attention controls")
    p.add_argument("--method", default="flowedit", choices=["flowedit"],
                   help="with --from-image: the inversion-free method (default: flowedit)")
    p.add_argument("--n-max", type=whole(0), default=None, metavar="N",
                   help="FlowEdit: the last N of the --steps noise levels are walked (the edit's strength) "
                   "(default: the family's, SD3 33 of 50, Flux 24 of 28)")
    p.add_argument("--n-avg", type=whole(1), default=None, metavar="N",
                   help="FlowEdit: noise draws averaged per step (default: 1)")
    p.add_argument("--source-guidance", type=number(0), default=None,
                   help="FlowEdit: guidance of the source velocity (default: the family's, SD3 3.5, Flux 1.5)")
    p.add_argument("--target-guidance", type=number(0), default=None,
                   help="FlowEdit: guidance of the target velocity (default: the family's, SD3 13.5, Flux 5.5)")
    _edit_flags(p)
    _common(p, "p2p-out/edit", steps_default=PIPELINE_DEFAULT + "; with --from-image the family's FlowEdit steps")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("demo", help="the tour: maps, word swap, local blend, sweeps, refine, re-weight, analysis",
                       description="Show on the bundled model, with pictures and the numbers that measure them, what "
                       "each word attends to, why a one-word change moves the whole image, and how attention control "
                       "(replace, local blend, refine, re-weight) keeps it; one self-contained HTML report.")
    p.add_argument("--steps", type=argtypes.steps(), default=None,
                   help=f"denoising steps, at most {MAX_STEPS} (default: 50; 8 with --quick)")
    p.add_argument("--pairs", type=whole(0), default=None,
                   help="seeded edit pairs to measure (default: 6; 1 with --quick)")
    p.add_argument("--guidance", type=number(0), default=None,
                   help="classifier-free guidance scale; 1 or less turns it off (default: 7.5)")
    p.add_argument("--seed", type=argtypes.seed(), default=None,
                   help="seed of the showcased prompts (default: 2; the measured pairs keep their own seeds)")
    p.add_argument("--quick", action="store_true", help="a reduced tour (few steps, short sweeps) for a fast check")
    _machine(p, "p2p-out/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sweep", help="run a study: every combination of prompts, seeds and settings, with measures",
                       description="Run every case of a study file (model, edits, a grid of settings, measures; see "
                       "examples/*.yaml) into one folder: each case's pictures and settings, results.csv / .jsonl, and "
                       "a contact sheet (index.html). Resumable: run again with the same --out to finish a sweep that "
                       "stopped. --processes N splits the cases across N processes (GPUs) through accelerate.")
    from .sweep import add_arguments

    add_arguments(p)
    p.add_argument("--processes", type=whole(1), default=1,
                   help="processes to split the cases across, through `accelerate launch` (default: 1)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("ui", help="an interactive local web page: maps, edits, real images, the swap analysis",
                       description="Start a local web page (gradio; install with pip install -e '.[ui]') with four "
                       "tabs: Maps, Edit, Real image, Why. It listens on 127.0.0.1 unless told otherwise, shares "
                       "nothing publicly unless --share is given, and runs one generation at a time.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"bundled name ({DEFAULT_MODEL}, shapes-flow), pipeline folder or cached hub id "
                   f"(default: {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=whole(1), default=7860, help="port, 1 to 65535 (default: 7860)")
    p.add_argument("--share", action="store_true", help="also publish a public gradio.live link (off by default)")
    p.add_argument("--steps", type=argtypes.steps(), default=50,
                   help=f"the page's starting number of denoising steps, each tab's steps slider, at most {MAX_STEPS} "
                   "(default: 50)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    _precision(p)
    p.set_defaults(func=cmd_ui)

    from .families import FAMILIES

    inverts = ", ".join(dict.fromkeys(f.title for f in FAMILIES.values() if f.invertible))
    not_yet = ", ".join(dict.fromkeys(f.title for f in FAMILIES.values() if not f.invertible))
    p = sub.add_parser("invert", help="invert a real image (null-text, DDIM, negative-prompt, direct; FireFlow, "
                       "RF-Solver or Euler on flow models) for editing",
                       description=f"Invert an image under its caption so that sampling regenerates it, on {inverts} "
                       f"pipelines{f' (not yet: {not_yet})' if not_yet else ''}. The result (starting latent, per-step "
                       "unconditional embeddings, a direct inversion's latent path, the model, settings) goes to one "
                       "safetensors file for `p2p edit --from`; the reconstruction is written beside it and its PSNR "
                       "printed. Inversion is deterministic: it takes no seed.")
    p.add_argument("image", help="image file, any size and mode (centre-cropped and resized to the inversion size; "
                   "enlarging more than 4 times is refused)")
    p.add_argument("caption", help="a caption of the image (becomes the source prompt of edits)")
    p.add_argument("--method", default="auto", choices=["auto", "null-text", "ddim", "negative-prompt",
                                                        "direct", "fireflow", "euler", "rf-solver"],
                   help="DDPM-type models (SD 1.x / 2.x, shapes): null-text (Mokady et al. 2022), plain ddim, "
                   "negative-prompt (no optimisation), or direct (Ju et al. 2023: the source is pinned to the "
                   "inversion's path while edits run free; no optimisation); flow models (SD3, Flux, shapes-flow): "
                   "fireflow (second order, one model call a step), rf-solver (second order, two calls a step) or "
                   "euler; auto (default): null-text or fireflow")
    p.add_argument("--inner-steps", type=whole(1), default=10, help="null-text: Adam steps per timestep (default: 10)")
    p.add_argument("--offsets", type=whole(0), nargs=4, default=[0, 0, 0, 0],
                   metavar=("LEFT", "RIGHT", "TOP", "BOTTOM"),
                   help="pixels to cut from each side before the centre crop (default: 0 0 0 0)")
    _machine(p, "p2p-out/inversion.safetensors", "inversion file to write")
    _sampling(p, seed=False, guidance=None, guidance_default="7.5 for the DDPM-type methods, 2 for fireflow, "
              "rf-solver and euler, where 7.5 does not invert")
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("swap-analysis", help="why a one-word swap changes the whole image, vanilla vs controlled",
                       description="Measure, for a source and a word-swapped prompt from one seed, the share of pixels "
                       "whose most-attended word changes at the first step, and how the latents drift apart over the "
                       "steps without and with attention control. Writes numbers (JSON), a plot and an HTML page.")
    p.add_argument("source", help="the source prompt")
    p.add_argument("target", help="the prompt with one word swapped")
    _edit_flags(p)
    _common(p, "p2p-out/swap")
    p.set_defaults(func=cmd_swap)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .outputs import Terminated, terminate_like_interrupt

    args = build_parser().parse_args(argv)
    if getattr(args, "model", DEFAULT_MODEL) is None and not getattr(args, "from_inversion", None):
        args.model = DEFAULT_MODEL  # (an edit from an inversion file takes the file's model: cmd_edit)
    terminate_like_interrupt()  # SIGTERM unwinds as Ctrl-C does: temporary files and folders are removed
    try:
        args.func(args)
    except P2PError as e:
        print(f"p2p {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signal = "terminated" if isinstance(e, Terminated) else "interrupted"
        kept = ("every finished case is kept; run the same command again to continue" if args.command == "sweep"
                else "no unfinished output was kept")
        print(f"p2p {args.command}: {signal}; {kept}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
