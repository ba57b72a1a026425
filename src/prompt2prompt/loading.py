"""Loading Stable Diffusion pipelines: the bundled model by name, a local folder, or a hub id from the local cache."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ModelError

BUNDLED = {"shapes": Path(__file__).parent / "models" / "shapes"}  # models shipped inside the package
DEFAULT_MODEL = "shapes"
_SD_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def family(pipe) -> str:
    """'sd1', 'sd2' or 'sdxl', from the pipeline's components."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    v_pred = pipe.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
    return "sd2" if v_pred or pipe.text_encoder.config.hidden_size >= 1024 else "sd1"


def resolve(name_or_path: str | Path) -> Path:
    """The local folder of a bundled name, a local folder, or a hub id found in the local cache."""
    name = str(name_or_path)
    if name in BUNDLED:
        folder = BUNDLED[name]
        if not (folder / "model_index.json").exists():
            raise ModelError(
                f"the bundled model {name!r} is not installed at {folder} (it ships once its training passes its "
                "quality bars; train it with `python -m prompt2prompt.shapes.train`), or pass --model FOLDER"
            )
        return folder
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").exists():
            raise ModelError(
                f"{path} is not a diffusers pipeline folder: expected a folder with model_index.json "
                "(as pipeline.save_pretrained writes)"
            )
        return path
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelError(
            f"{name!r} is neither a bundled model ({', '.join(BUNDLED)}), an existing folder, "
            "nor a hub id like 'owner/name'"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, or an invalid id
        raise ModelError(
            f"the hub model {name!r} is not in the local Hugging Face cache, and nothing is downloaded here: "
            "put it in the cache on a machine with a network, or pass a local pipeline folder"
        ) from e


def load_pipeline(name_or_path: str | Path = DEFAULT_MODEL, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32):
    """A Stable Diffusion 1.x / 2.x / XL pipeline, offline: bundled name, local folder, or cached hub id."""
    from diffusers import DiffusionPipeline

    folder = resolve(name_or_path)
    index = json.loads((folder / "model_index.json").read_text())
    cls = index.get("_class_name", "?")
    if cls not in _SD_CLASSES or "unet" not in index:
        raise ModelError(f"{folder} holds a {cls}: expected a Stable Diffusion 1.x, 2.x or XL text-to-image pipeline "
                         f"({' or '.join(_SD_CLASSES)})")
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls == "StableDiffusionPipeline" else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **extra)
    except Exception as e:
        raise ModelError(f"could not load the pipeline in {folder}: {type(e).__name__}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
