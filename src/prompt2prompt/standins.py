"""Components of a pipeline folder that transformers cannot build on this machine, and what stands in for them.

A vision-language text encoder's processor holds an image (and video) half besides its tokenizer; transformers builds
some of those halves only with torchvision (Flux.2 [dev]'s PixtralProcessor, Qwen-Image 2.1's Qwen3VLProcessor, whose
video processor needs it). Text-to-image work reads only the text half, so that half, loaded from the processor's own
folder, stands in: the tokenizer itself where the pipeline calls the tokenizer's methods (Flux.2 [dev]), a
`TextProcessor` where it calls the processor (Qwen-Image 2.1: `processor(text=...)`, `processor.tokenizer`). What is
lost is said: an image input raises an error naming the missing library.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import ProcessorMixin

from .errors import InputError, ModelError


class TextProcessor(ProcessorMixin):
    """The text half of a processor transformers cannot build here: `processor(text=...)` tokenizes,
    `apply_chat_template` reads a conversation (or a batch of them) as the processor does (token ids batched),
    `tokenizer` is the tokenizer. Images or videos are refused with `reason`. Saving writes the tokenizer (its chat
    template with it) and the folder's other processor settings it was read with, so that a saved pipeline names
    the original processor class and holds the files that class reads (`after_loading`)."""

    def __init__(self, tokenizer, reason: str, settings: dict | None = None):  # no ProcessorMixin checks: none built
        self.tokenizer = tokenizer
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self.reason = reason  # why the real processor is not here, for the error on an image input
        self.settings = settings or {}  # {file name: JSON} of the processor folder's other settings, kept for saving

    def __call__(self, text=None, images=None, videos=None, **kwargs):
        if images is not None or videos is not None:
            raise InputError(f"{self.reason}: images cannot be read as inputs here; text-to-image works with the "
                             "processor's text half")
        return self.tokenizer(text, **kwargs)

    def apply_chat_template(self, conversation, **kwargs):
        single = bool(conversation) and isinstance(conversation[0], dict)
        return self.tokenizer.apply_chat_template([conversation] if single else conversation, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        folder = Path(save_directory)
        self.tokenizer.save_pretrained(str(folder))
        for name, settings in self.settings.items():
            (folder / name).write_text(json.dumps(settings, indent=2))
        return [str(folder)]

    def __repr__(self) -> str:
        return f"TextProcessor({type(self.tokenizer).__name__}: {self.reason})"


def stand_ins(folder: Path, index: dict) -> tuple[dict, dict]:
    """({component: stand-in registered after loading}, {component: object handed to `from_pretrained`}) for the
    processors of model_index.json. A processor class transformers holds only as a placeholder (a library missing)
    stands in as its folder's text tokenizer, put in place after loading (Flux.2 [dev]); a processor class it has
    is loaded here once and handed over, or where building it needs a missing library (ImportError) its text half
    (`TextProcessor`) is handed over, as the pipeline's constructor already reads it (Qwen-Image 2.1). Any other
    component transformers holds only as a placeholder is refused, naming what it needs."""
    import transformers

    try:
        from transformers.utils.import_utils import DummyObject
    except ImportError:  # a transformers without placeholders: every class it names can be built
        DummyObject = None
    after, passed = {}, {}
    for name, entry in index.items():  # [library, class] (a modular index: [library, class, loading spec])
        if name.startswith("_") or not isinstance(entry, list) or len(entry) not in (2, 3) or \
                entry[0] != "transformers":
            continue
        named = str(entry[1]) if entry[1] != "AutoProcessor" else _processor_class(folder / name)
        cls = getattr(transformers, named, None)
        processor = named.endswith("Processor")
        if DummyObject is not None and isinstance(cls, DummyObject):
            needs = " and ".join(getattr(cls, "_backends", ())) or "a library that is not installed"
            cannot = f"{folder}'s {name} is a {named}, which transformers cannot build without {needs} " \
                     "(not installed)"
            if not processor:
                raise ModelError(f"{cannot}: install it to load this pipeline")
            after[name] = _processor_tokenizer(folder / name, cannot)
        elif processor and isinstance(cls, type) and issubclass(cls, ProcessorMixin):
            try:
                passed[name] = cls.from_pretrained(str(folder / name), local_files_only=True)
            except ImportError as e:
                first = " ".join(str(e).split()).split(". ")[0] or type(e).__name__  # its first sentence
                cannot = f"{folder}'s {name} is a {named}, which transformers cannot build here ({first})"
                passed[name] = TextProcessor(_processor_tokenizer(folder / name, cannot), cannot,
                                             _settings(folder / name))
            except Exception as e:
                raise ModelError(f"could not load {folder}'s {name} ({named}): {type(e).__name__}: {e}") from e
    return after, passed


def after_loading(pipe, index: dict, after: dict, passed: dict) -> None:
    """Put the stand-ins loaded after the pipeline in place, and record each stand-in under the class its folder
    names, so that saving the pipeline writes the folder's model_index.json as it was."""
    if after:
        pipe.register_modules(**after)
    for name, component in passed.items():
        if isinstance(component, TextProcessor):
            pipe.register_to_config(**{name: tuple(index[name])})


def _processor_class(path: Path) -> str:
    """The processor class an AutoProcessor folder names (`processor_class` in its processor_config.json,
    preprocessor_config.json or tokenizer_config.json, as AutoProcessor reads it); "AutoProcessor" if none does."""
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            named = json.loads((path / name).read_text()).get("processor_class")
        except (OSError, ValueError, AttributeError):
            continue
        if named:
            return str(named)
    return "AutoProcessor"


def _settings(path: Path) -> dict:
    """{file name: JSON} of the processor folder's settings other than the tokenizer's (image and video processors,
    processor_config.json), kept so that a stand-in saves them again."""
    found = {}
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"):
        try:
            found[name] = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
    return found


def _processor_tokenizer(path: Path, cannot: str):
    """The text tokenizer saved in a processor's folder, with the processor's chat template (chat_template.jinja, or
    chat_template.json's "chat_template") where the tokenizer's own files hold none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ModelError(f"{cannot}, and the text tokenizer in {path} could not be loaded in its place "
                         f"({type(e).__name__}: {e})") from e
    if not getattr(tokenizer, "chat_template", None):
        try:
            if (path / "chat_template.jinja").is_file():
                tokenizer.chat_template = (path / "chat_template.jinja").read_text()
            elif (path / "chat_template.json").is_file():
                tokenizer.chat_template = json.loads((path / "chat_template.json").read_text())["chat_template"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{cannot}, and the chat template in {path} could not be read for its text tokenizer "
                             f"({type(e).__name__}: {e})") from e
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{cannot}, and its text tokenizer in {path} has no chat template (chat_template.jinja or "
                         "chat_template.json) to stand in with")
    return tokenizer
