"""Loading Stable Diffusion pipelines: the bundled model by name, a local folder, or a hub id from the local cache."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ModelError
from .families import PIPELINES, SUPPORTED, family_of

MODELS = Path(__file__).parent / "models"
BUNDLED = {"shapes": MODELS / "shapes", "shapes-flow": MODELS / "shapes-flow"}  # models shipped inside the package
DEFAULT_MODEL = "shapes"
_SD_CLASSES = tuple(PIPELINES)  # the pipeline classes a folder may hold (families.py)


def family(pipe) -> str:
    """'sd1', 'sd2', 'sdxl', 'sd3', 'flux', 'flux2', ...: the name of the pipeline's `families.Family`."""
    return family_of(pipe).name


def outside_vocabulary(model: str | None, prompts) -> str | None:
    """On a bundled model, a warning naming the prompts' words its training never showed it (they are tokenised and
    attended to, but nothing teaches the model to draw them); None when there are none or the model is not bundled."""
    if model not in BUNDLED:
        return None
    import re

    from .shapes import world

    words = world.vocabulary()
    unknown = sorted({w for p in prompts for w in re.findall(r"[a-z']+", p.lower())} - set(words))
    if not unknown:
        return None
    return (f"the bundled {model} model learned only the shapes world's words ({', '.join(words)}); "
            f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} outside them and will not be "
            "drawn as asked")


def default_part(pipe) -> str | None:
    """Which encoder's part of a joint text sequence a word's map is read from by default: SD3's CLIP part (its T5
    part is zeros when the pipeline has no T5, as the bundled flow model); None for one-encoder sequences."""
    return family_of(pipe).default_part


def resolve(name_or_path: str | Path) -> Path:
    """The local folder of a bundled name, a local folder, or a hub id found in the local cache."""
    name = str(name_or_path)
    if name in BUNDLED:
        folder = BUNDLED[name]
        if not (folder / "model_index.json").exists():
            raise ModelError(
                f"the bundled model {name!r} is not installed at {folder} (it ships once its training passes its "
                "quality bars: the training command is in `python -m prompt2prompt.shapes.train --help`), or pass "
                "--model FOLDER"
            )
        return folder
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or index_file(path) is None:
            raise ModelError(
                f"{path} is not a diffusers pipeline folder: expected a folder with model_index.json "
                "(as pipeline.save_pretrained writes) or modular_model_index.json (a modular pipeline's)"
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


INDEX_FILES = ("model_index.json", "modular_model_index.json")  # what save_pretrained writes: a pipeline's, a
# Modular Diffusers pipeline's


def index_file(folder: Path) -> Path | None:
    """The folder's pipeline index (`INDEX_FILES`, the first found), or None."""
    return next((folder / name for name in INDEX_FILES if (folder / name).is_file()), None)


def samples_by_flow(name_or_path: str | Path) -> bool:
    """Whether the pipeline a name or folder holds samples by flow matching (a FlowMatch scheduler in its
    model_index.json, or a family that does), read before loading it; False where that cannot be read (loading
    says why)."""
    try:
        index = json.loads(index_file(resolve(name_or_path)).read_text())
        families = PIPELINES.get(index.get("_class_name"), ())
        return "FlowMatch" in str(index.get("scheduler", ["", ""])[1]) or any(f.flow for f in families)
    except (ModelError, OSError, ValueError, TypeError, IndexError, AttributeError):
        return False


def resolve_device(name: str | None) -> torch.device:
    """A torch device that exists on this machine: the name checked before anything is loaded onto it."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ModelError(f"unknown device {name!r}: expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelError(f"device {name!r} was asked, but this machine has no CUDA GPU "
                             f"(torch {torch.__version__}); expected cpu")
        if device.index is not None and device.index >= count:
            raise ModelError(f"device {name!r} was asked, but this machine has {count} CUDA GPU(s): "
                             f"cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelError(f"device {name!r} was asked, but MPS (Apple GPUs) is not available here; expected cpu")
    elif device.type != "cpu":
        raise ModelError(f"device {name!r} is not supported: expected cpu, cuda, cuda:N or mps")
    elif device.index not in (None, 0):
        raise ModelError(f"device {name!r}: the CPU is one device, cpu (torch would take {name!r} for it silently)")
    return device


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --dtype names
OFFLOADS = ("model", "sequential")  # diffusers' enable_model_cpu_offload / enable_sequential_cpu_offload


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a --dtype name, checked against the device: fp16 needs a GPU (on the CPU many of its
    kernels are missing or slow); bf16 (SD3's and Flux's native precision) runs on the CPU too."""
    if name not in DTYPES:
        raise ModelError(f"unknown precision {name!r}: expected one of {', '.join(DTYPES)}")
    if name == "fp16" and device.type == "cpu":
        raise ModelError("fp16 needs a GPU device (--device cuda or mps); on the CPU use fp32 or bf16")
    return DTYPES[name]


def check_offload(offload: str | None, device: torch.device) -> None:
    """Offloading keeps weights on the CPU and moves each part to the accelerator when it runs: it needs one."""
    if offload is None:
        return
    if offload not in OFFLOADS:
        raise ModelError(f"unknown offload {offload!r}: expected one of {', '.join(OFFLOADS)}")
    if device.type == "cpu":
        has = "" if torch.cuda.is_available() else " (this machine has none)"
        raise ModelError(f"offload {offload!r} keeps weights on the CPU and runs each part on an accelerator, but the "
                         f"device is the CPU{has}: run without offload, or with --device cuda")


def model_name(pipe, given: str | Path = "") -> str:
    """How results and files name a pipeline's model: as the caller gave it, else the folder it was loaded from (a
    bundled model by its name), so a result made from the API still says which model made it."""
    if given:
        return str(given)
    path = str(getattr(pipe, "name_or_path", "") or "")
    for name, folder in BUNDLED.items():
        if path and Path(path).resolve() == folder.resolve():
            return name
    return path


@contextmanager
def _loading_bars(shown: bool):
    """diffusers' and transformers' progress bars on or off for the block, as they were afterwards."""
    import diffusers
    import transformers

    libraries = (diffusers.utils.logging, transformers.utils.logging)
    before = [lib.is_progress_bar_enabled() for lib in libraries]
    for lib in libraries:
        (lib.enable_progress_bar if shown else lib.disable_progress_bar)()
    try:
        yield
    finally:
        for lib, was in zip(libraries, before):
            (lib.enable_progress_bar if was else lib.disable_progress_bar)()


def load_pipeline(name_or_path: str | Path = DEFAULT_MODEL, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, offload: str | None = None, progress: bool = False):
    """A pipeline of one of the supported families (`families.SUPPORTED`), offline: bundled name, local folder, or
    cached hub id. offload: "model" (each component moved to the device while it runs) or "sequential" (each layer: the
    least memory, the slowest), diffusers' own CPU offloading; None keeps every component on the device. progress:
    diffusers' and transformers' loading bars (off by default: in a notebook they arrive as lines of stderr)."""
    device = torch.device(device)
    check_offload(offload, device)
    folder = resolve(name_or_path)
    path = index_file(folder)
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e}); expected the file that pipeline.save_pretrained "
                         "writes") from None
    cls = index.get("_class_name", "?") if isinstance(index, dict) else "?"
    if cls not in _SD_CLASSES or not ("unet" in index or "transformer" in index):
        raise ModelError(f"{folder} holds a {cls}: expected a {SUPPORTED} text-to-image pipeline "
                         f"({', '.join(_SD_CLASSES)})")
    components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
    missing = [k for k in components if not (folder / k).is_dir()]
    if missing:
        raise ModelError(f"{folder} lacks the component folder(s) {', '.join(m + '/' for m in missing)} that its "
                         f"{path.name} lists ({', '.join(components)})")
    family_ = PIPELINES[cls][0]  # the class's families load alike (SD 1.x and 2.x share it)
    if not family_.installed:
        import diffusers

        raise ModelError(f"{folder} holds a {cls} ({family_.title}), which this diffusers "
                         f"({diffusers.__version__}) does not have: install a diffusers that does")
    if offload is not None and path.name != "model_index.json":
        raise ModelError(f"{folder} holds a modular pipeline ({cls}), which diffusers offloads through a "
                         "ComponentsManager, not offload=: run it without offload")
    try:
        with _loading_bars(progress):
            pipe = family_.from_folder(folder, index, dtype)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"could not load the pipeline in {folder}: {type(e).__name__}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    if offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
        return pipe
    return pipe.to(device)
