"""Resume points: what a run needs to start again when its folder is gone, small enough to commit.

A run's folder (`runs.py`) holds its full checkpoint, optimiser state included, and lives outside the checkout; if it
is lost, the run would start from nothing. A resume point is its EMA weights in fp16, one safetensors file per model
(`training/NAME.safetensors`, at most `POINT_LIMIT` bytes), with as metadata the step, the hours trained, the recipe,
the command as typed, the latents' scaling and shift factors, the evaluations so far, the tokenizer's files (when the
run made its own) and the autoencoder: its weights in the file when they fit, else the name of a bundled model whose
autoencoder is the run's, checked by digest. `python -m prompt2prompt.shapes.runs point NAME` writes one;
`runs resume` restarts every run whose folder is missing from its point (`train --restart-from FILE`).

A restart is not the run it replaces, step for step: the weights are the EMA's rounded to fp16, the optimiser's
moments start at zero (so the learning rate warms up again over `--warmup` steps) and the EMA starts from the
restored weights. The data draws are the same (each step's batch is seeded by the step).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import InputError

POINT_LIMIT = 10_000_000  # bytes a committed resume point may take (one file per model)
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def digest(state_dict: dict) -> str:
    """sha256 of a network's weights (names and fp32 values, in name order): which autoencoder a run was trained on."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key].detach().cpu()
        h.update(key.encode())
        h.update((value.float() if value.is_floating_point() else value).contiguous().numpy().tobytes())
    return h.hexdigest()


def _fp16(parts: dict) -> dict:
    """Each network's parameters in fp16, as 'component.name'. Buffers are left out: these networks build theirs
    from their config (position ids, SD3's sine-cosine position table), and `restore` checks that only buffers were."""
    return {f"{name}.{key}": (value.half() if value.is_floating_point() else value).detach().cpu().contiguous()
            for name, net in parts.items() for key, value in net.named_parameters()}


def _bundled_with(vae_digest: str) -> str | None:
    """The bundled model whose autoencoder has these weights, if one has."""
    from safetensors.torch import load_file

    from ..loading import BUNDLED

    for name, folder in BUNDLED.items():
        weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
        if weights.exists() and digest(load_file(weights)) == vae_digest:
            return name
    return None


def write_point(path: Path, nets: dict, vae, meta: dict, vae_from: str = "", tokenizer_folder: Path | None = None,
                limit: int = POINT_LIMIT) -> Path:
    """Write the resume point of `nets` (their current weights: the EMA's) to `path`. The autoencoder goes in the file
    when the whole fits in `limit` bytes; else the point names where it is: the run's --vae-from, or a bundled model
    whose autoencoder has the same weights (InputError when none has)."""
    from safetensors.torch import save_file

    vae_digest = digest(vae.state_dict())
    tensors = _fp16(nets)
    meta = {**meta, "vae_sha256": vae_digest}
    if tokenizer_folder is not None and not vae_from:  # the run made its own tokenizer: a few kB of text
        meta["tokenizer"] = {name: (tokenizer_folder / name).read_text() for name in TOKENIZER_FILES}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with_vae = _fp16({"vae": vae})
    if vae_from:
        meta["vae_source"] = vae_from
    elif size + sum(t.numel() * t.element_size() for t in with_vae.values()) <= limit:
        tensors.update(with_vae)
        meta["vae_sha256"] = digest({k[len("vae."):]: v for k, v in with_vae.items()})  # as stored: fp16
    else:
        source = _bundled_with(vae_digest)
        if source is None:
            raise InputError(f"the networks take {size / 1e6:.1f} MB in fp16 and the autoencoder does not fit beside "
                             f"them under {limit / 1e6:.0f} MB, and no bundled model has this run's autoencoder: "
                             "ship the model first (its autoencoder is then found by digest)")
        meta["vae_source"] = source
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size > limit:
        raise InputError(f"a resume point of these networks takes {size / 1e6:.1f} MB in fp16; at most "
                         f"{limit / 1e6:.0f} MB is committed per model")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
    tmp.replace(path)  # replaced in place, never half-written
    return path


def read_point(path: Path) -> tuple[dict, dict]:
    """(tensors by 'component.key', metadata) of a resume point or a milestone file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"expected a resume point file (.safetensors), got {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        tensors = load_file(path)
    except (SafetensorError, json.JSONDecodeError, OSError) as error:
        raise InputError(f"{path} is not a resume point (a safetensors file with JSON metadata): {error}") from None
    if "step" not in meta or "config" not in meta:
        raise InputError(f"{path} has no step and recipe in its metadata: it was not written by `runs point` or as a "
                         "milestone")
    return tensors, meta


def write_tokenizer(meta: dict, folder: Path) -> bool:
    """Put the point's tokenizer files in `folder`; False when the point holds none (a --vae-from run)."""
    files = meta.get("tokenizer")
    if not files:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        (folder / name).write_text(files[name])
    return True


def load_weights(net, weights: dict, name: str) -> None:
    """Load a point's or a milestone's weights (fp16 values into the fp32 parameters); every parameter must be there,
    only buffers (which the network built itself) may be missing."""
    missing, unexpected = net.load_state_dict(weights, strict=False)
    parameters = dict(net.named_parameters())
    lost = [k for k in missing if k in parameters]
    if lost or unexpected:
        raise InputError(f"the weights' {name} does not fit this network: "
                         f"{'missing ' + ', '.join(lost[:3]) if lost else 'unexpected ' + ', '.join(unexpected[:3])}")


def restore(tensors: dict, meta: dict, nets: dict, vae) -> dict:
    """Load the point's weights into `nets` and the run's autoencoder into `vae` (from the file, or its source,
    checked by digest); returns what the restarted run's state starts with."""
    from safetensors.torch import load_file

    from ..loading import resolve

    for name, net in nets.items():
        own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        load_weights(net, own, name)
    own = {k[len("vae.") :]: v for k, v in tensors.items() if k.startswith("vae.")}
    if not own:
        source = meta.get("vae_source")
        if not source:
            raise InputError("the resume point holds no autoencoder and names none")
        own = load_file(resolve(source) / "vae" / "diffusion_pytorch_model.safetensors")
        where = f"the autoencoder of {source}"
    else:
        where = "the point's autoencoder"
    if "vae_sha256" in meta and digest(own) != meta["vae_sha256"]:
        raise InputError(f"{where} is not the one the run was trained on (its weights differ): restart with the "
                         "autoencoder the run used")
    load_weights(vae, own, "vae")
    return {"step": int(meta["step"]), "seconds": float(meta["hours"]) * 3600, "warm_from": int(meta["step"]),
            "restarts": [int(meta["step"])]}
