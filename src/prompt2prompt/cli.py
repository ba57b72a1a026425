"""`p2p`: a thin command line over the library. Every subcommand writes pictures, JSON and an index.html."""

from __future__ import annotations

import argparse
import sys

from .errors import P2PError
from .loading import DEFAULT_MODEL


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"bundled model name, local diffusers folder, or cached hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared initial latent (default: 0)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--fp16", action="store_true", help="half precision (GPU only)")
    p.add_argument("--out", default=out, help=f"output folder (default: {out})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _options(args):
    from .generation import GenerationOptions

    return GenerationOptions(steps=args.steps, guidance=args.guidance, seed=args.seed, height=args.height,
                             width=args.width)


def _pipe(args):
    import torch

    from .loading import load_pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if args.fp16 else torch.float32
    if not args.quiet:
        print(f"loading {args.model} on {device}", file=sys.stderr)
    return load_pipeline(args.model, device=device, dtype=dtype)


def cmd_attend(args) -> None:
    from .attend import attend, write_outputs
    from .store import RecordOptions

    pipe = _pipe(args)
    record = RecordOptions(self_attention=args.components > 0)
    result = attend(pipe, args.prompt, _options(args), record, model=args.model, progress=not args.quiet)
    res = tuple(args.res) if args.res else None
    files = write_outputs(result, args.out, res=res, components=args.components)
    print(f"wrote {len(files)} files to {args.out}; open {files['html']}")


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
