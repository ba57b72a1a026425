"""`p2p`: a thin command line over the library. Every subcommand writes pictures, JSON and an index.html."""

from __future__ import annotations

import argparse
import sys

from .errors import P2PError
from .loading import DEFAULT_MODEL


def _machine(p: argparse.ArgumentParser, out: str, out_is: str = "output folder") -> None:
    """The flags every command has: model, device, precision, output, quietness."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"bundled model name, local diffusers folder, or cached hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--fp16", action="store_true", help="half precision (GPU only)")
    p.add_argument("--out", default=out, help=f"{out_is} (default: {out})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _common(p: argparse.ArgumentParser, out: str, out_is: str = "output folder") -> None:
    """_machine's flags and the generation settings."""
    _machine(p, out, out_is)
    p.add_argument("--seed", type=int, default=0, help="seed of the shared initial latent (default: 0)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")


def _options(args):
    from .generation import GenerationOptions

    return GenerationOptions(steps=args.steps, guidance=args.guidance, seed=args.seed, height=args.height,
                             width=args.width)


def _pipe(args):
    import diffusers
    import torch
    import transformers

    from .loading import load_pipeline

    # library notices (torchvision fallbacks, weight-loading bars) are noise for a CLI user
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if args.fp16 else torch.float32
    if not args.quiet:
        print(f"loading {args.model} on {device}", file=sys.stderr)
    return load_pipeline(args.model, device=device, dtype=dtype)


def cmd_attend(args) -> None:
    from .attend import attend
    from .figures import write_attend
    from .store import RecordOptions

    pipe = _pipe(args)
    record = RecordOptions(self_attention=args.components > 0)
    result = attend(pipe, args.prompt, _options(args), record, model=args.model, progress=not args.quiet)
    res = tuple(args.res) if args.res else None
    files = write_attend(result, args.out, res=res, components=args.components)
    print(f"wrote {len(files)} files to {args.out}; open {files['html']}")


def _edit_options(args):
    from .edits import EditOptions
    from .errors import P2PError
    from .schedule import parse_spans

    reweight = []
    for item in args.reweight or []:
        word, _, factor = item.partition("=")
        try:
            reweight.append((word, float(factor)))
        except ValueError:
            raise P2PError(f"--reweight expects WORD=FACTOR such as circle=2 or circle=-1, got {item!r}") from None
    self_steps = parse_spans(args.self_steps)
    if isinstance(self_steps, dict):
        raise P2PError(f"--self-steps takes a fraction or a pair (0.4 or 0.1,0.4), not per word: {args.self_steps}")
    return EditOptions(
        mode=args.mode, cross_steps=parse_spans(args.cross_steps), self_steps=self_steps,
        reweight=tuple(reweight), blend=tuple(args.blend or ()), subtract=tuple(args.subtract or ()),
        threshold=args.threshold, blend_start=args.blend_start,
    )


def _edit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="auto", choices=["auto", "replace", "refine", "reweight"],
                   help="replace: word swap (same number of words); refine: added words (token alignment); "
                   "reweight: same prompt, re-weighted words; auto: replace if the word counts match, else refine")
    p.add_argument("--cross-steps", default="0.8",
                   help="fraction of steps whose cross-attention comes from the source: 0.8, a pair 0.1,0.8, or "
                   "per word default=1.0,lion=0.4 (pairs per word as lion=0.1:0.4) (default: 0.8)")
    p.add_argument("--self-steps", default="0.4",
                   help="fraction (or pair) of steps whose self-attention comes from the source (default: 0.4)")
    p.add_argument("--reweight", nargs="+", metavar="WORD=FACTOR",
                   help="scale words' cross-attention, e.g. circle=2 red=-1")
    p.add_argument("--blend", nargs="+", metavar="WORD",
                   help="local blend: words whose attention marks the region allowed to change (in any prompt)")
    p.add_argument("--subtract", nargs="+", metavar="WORD", help="local blend: words whose region must not change")
    p.add_argument("--threshold", type=float, default=0.3, help="local blend mask threshold (default: 0.3)")
    p.add_argument("--blend-start", type=float, default=0.2,
                   help="fraction of steps before local blending starts (default: 0.2)")


def cmd_edit(args) -> None:
    from .edits import edit
    from .figures import write_edit
    from .inversion import Inversion

    options = _edit_options(args)
    inversion = Inversion.load(args.from_inversion) if args.from_inversion else None
    pipe = _pipe(args)
    result = edit(pipe, args.source, args.targets, options, _options(args), progress=not args.quiet,
                  inversion=inversion)
    files = write_edit(result, args.out, model=args.model)
    print(f"wrote {len(files)} files to {args.out}; open {files['html']}")


def cmd_invert(args) -> None:
    from .generation import GenerationOptions, generate
    from .inversion import InversionOptions, autoencoder_reconstruction, invert, psnr

    options = InversionOptions(method=args.method, steps=args.steps, guidance=args.guidance,
                               inner_steps=args.inner_steps, offsets=tuple(args.offsets))
    pipe = _pipe(args)
    inv = invert(pipe, args.image, args.caption, options, progress=not args.quiet, model=args.model)
    rec = generate(pipe, [args.caption], None, GenerationOptions(steps=args.steps, guidance=args.guidance),
                   latent=inv.latent, uncond=inv.uncond, progress=not args.quiet).images[0]
    ae = autoencoder_reconstruction(pipe, inv.image)
    inv.settings.update(psnr_vs_input=psnr(rec, inv.image), psnr_vs_autoencoder=psnr(rec, ae))
    path = inv.save(args.out)
    rec_path = path.with_name(path.stem + "_reconstruction.png")
    rec.save(rec_path)
    print(f"{args.method} inversion in {inv.settings['seconds']:.1f} s: reconstruction PSNR "
          f"{inv.settings['psnr_vs_input']:.2f} dB against the input, {inv.settings['psnr_vs_autoencoder']:.2f} dB "
          f"against the autoencoder's own reconstruction")
    print(f"wrote {path} and {rec_path}; edit with: p2p edit --from {path} \"{args.caption}\" \"EDITED CAPTION\"")


def cmd_swap(args) -> None:
    from .analysis import swap_analysis
    from .figures import write_swap

    options = _edit_options(args)
    pipe = _pipe(args)
    result = swap_analysis(pipe, args.source, args.target, _options(args), options, progress=not args.quiet)
    files = write_swap(result, args.out, model=args.model)
    print(f"first step: {result.argmax_changed:.1%} of pixels change their most-attended word; final latent drift "
          f"vanilla {result.drift_vanilla[-1]:.3f} vs controlled {result.drift_controlled[-1]:.3f}")
    print(f"wrote {len(files)} files to {args.out}; open {files['html']}")


def cmd_demo(args) -> None:
    from dataclasses import replace

    from .demo import DemoOptions, quick_options, run_demo

    options = quick_options() if args.quick else DemoOptions()
    options = replace(options, **{k: v for k, v in (("steps", args.steps), ("pairs", args.pairs)) if v is not None})
    pipe = _pipe(args)
    run_demo(pipe, args.out, options, model=args.model, quiet=args.quiet)
    print(f"wrote {args.out}; open {args.out}/index.html")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2p", description="Look inside Stable Diffusion's attention and edit "
                                     "images by controlling it (Prompt-to-Prompt).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("attend", help="generate an image and write its cross-/self-attention maps",
                       description="Generate an image and write per-token cross-attention maps, overlays, the "
                       "most-attended token per pixel, self-attention components, the maps as safetensors + JSON, "
                       "and a self-contained index.html.")
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--res", type=int, nargs="+", default=None,
                   help="map sides to aggregate (e.g. 16, or 16 32); default: every recorded resolution, upsampled "
                   "to the largest")
    p.add_argument("--components", type=int, default=6,
                   help="self-attention principal components to draw; 0 records no self-attention (default: 6)")
    _common(p, "p2p-out/attend")
    p.set_defaults(func=cmd_attend)

    p = sub.add_parser("edit", help="Prompt-to-Prompt edit: vanilla row versus attention-controlled row",
                       description="Generate the source and edited prompts from one seed, without control (vanilla) "
                       "and with Prompt-to-Prompt attention control; write a labelled grid, each image, the settings "
                       "as JSON and an HTML page.")
    p.add_argument("source", help="the source prompt")
    p.add_argument("targets", nargs="+", help="one or more edited prompts")
    p.add_argument("--from", dest="from_inversion", default=None, metavar="INVERSION",
                   help="edit a real image: an inversion file from `p2p invert` (its caption must be the source; "
                   "its steps and guidance are used)")
    _edit_flags(p)
    _common(p, "p2p-out/edit")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("demo", help="the tour: maps, word swap, local blend, sweeps, refine, re-weight, analysis",
                       description="Run the seed notes' claims on the bundled model and write one self-contained "
                       "HTML report with pictures and the numbers that measure them.")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50; 8 with --quick)")
    p.add_argument("--pairs", type=int, default=None, help="seeded edit pairs to measure (default: 6; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="a reduced tour (few steps, short sweeps) for a fast check")
    _machine(p, "p2p-out/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("invert", help="invert a real image (DDIM / null-text / negative-prompt) for editing",
                       description="Invert an image under its caption so that sampling regenerates it; the result "
                       "(starting latent, per-step unconditional embeddings, settings) goes to one safetensors file "
                       "for `p2p edit --from`. Also writes the reconstruction and prints its PSNR.")
    p.add_argument("image", help="image file (any size and mode: centre-cropped and resized to the model's size)")
    p.add_argument("caption", help="a caption of the image (becomes the source prompt of edits)")
    p.add_argument("--method", default="null-text", choices=["null-text", "ddim", "negative-prompt"],
                   help="null-text (Mokady et al. 2022, default), plain ddim, or negative-prompt (no optimisation)")
    p.add_argument("--inner-steps", type=int, default=10, help="null-text: Adam steps per timestep (default: 10)")
    p.add_argument("--offsets", type=int, nargs=4, default=[0, 0, 0, 0], metavar=("LEFT", "RIGHT", "TOP", "BOTTOM"),
                   help="pixels to cut from each side before the centre crop (default: 0 0 0 0)")
    _common(p, "p2p-out/inversion.safetensors", "inversion file to write")
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
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except P2PError as e:
        print(f"p2p {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
