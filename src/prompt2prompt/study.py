"""A study: one YAML or JSON file naming a model, edits and a grid of settings, checked in full before anything runs.

    model: shapes                       # bundled name, pipeline folder or cached hub id
    dtype: fp32                         # precision: fp32 (default), fp16 (GPU) or bf16
    generation: {steps: 20}             # GenerationOptions fields shared by every case
    options: {threshold: 0.3}           # EditOptions fields shared by every case
    edits:                              # each: source, target (or targets: one case each), its own options and
      - source: a red circle and a blue square    # generation settings
        target: a red circle and a blue triangle
        options: {blend: [square, triangle]}
    grid:                               # factors, each a list; every combination is a case, for every edit
      seed: [0, 1, 2]
      cross_steps: [0.2, 0.8]
      local_blend: [false, true]
    measures: [truth, blend, drift]     # default: all of them (each where it applies)

A factor is any `EditOptions` or `GenerationOptions` field, or one of: `control`, "p2p" (attention-controlled, the
default) or "none" (the source and the target generated plainly from the same seed: the vanilla word swap; its
cases ignore the edit options, so combinations that differ only in them are one case); `local_blend`, true (the
default) or false (the edit's blend and subtract words left out). Values are written as in Python (`blend: [square,
triangle]`, `reweight: {blue: 2}`, `cross_steps: {square: 0.4, default: 0.8}`); an empty list `[]` turns a word
option off. Settings apply in this order, later ones winning: the study's, the edit's, the grid's.

Measures, per case (see `sweep.measure_case`):
- `truth` (on the bundled models; captions of the shapes world, one object's colour or shape swapped): the unchanged
  object's mask IoU between source and edit, whether the edit shows the new word, PSNR outside the edited object
  (`measure.py`);
- `blend` (cases with blend words): PSNR between source and edit outside the final local-blend mask, and the mask's
  share of the image;
- `drift`: the edit's final latent against the source's, relative L2.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from .edits import EditOptions
from .errors import InputError, P2PError
from .generation import GenerationOptions

MEASURES = ("truth", "blend", "drift")
CONTROLS = ("p2p", "none")
TOP_KEYS = ("model", "dtype", "generation", "options", "edits", "grid", "measures", "name")
DTYPES = ("fp32", "fp16", "bf16")
EDIT_FIELDS = tuple(f.name for f in fields(EditOptions))
GENERATION_FIELDS = tuple(f.name for f in fields(GenerationOptions))
FACTORS = (*EDIT_FIELDS, *GENERATION_FIELDS, "control", "local_blend")


@dataclass(frozen=True)
class Case:
    index: int  # position in the study's order (edits outer, grid factors inner, in file order)
    source: str
    target: str
    factors: dict  # the grid's values for this case ({} without a grid)
    options: EditOptions
    generation: GenerationOptions
    control: str  # "p2p" or "none"
    model: str = "shapes"  # the study's model and precision: part of what makes the pictures
    dtype: str = "fp32"

    @property
    def id(self) -> str:
        """A name derived from everything that makes the case's pictures (not its position), the model and its
        precision included: a re-run of an edited study finds the cases it already has, and only those."""
        key = json.dumps({"source": self.source, "target": self.target, "options": self.options.to_dict(),
                          "generation": self.generation.to_dict(), "control": self.control, "model": self.model,
                          "dtype": self.dtype}, sort_keys=True, default=str)
        return hashlib.sha1(key.encode()).hexdigest()[:12]

    def settings(self) -> dict:
        return {"id": self.id, "index": self.index, "source": self.source, "target": self.target,
                "model": self.model, "dtype": self.dtype, "factors": self.factors, "control": self.control,
                "options": self.options.to_dict(),
                "generation": self.generation.to_dict()}


@dataclass(frozen=True)
class Study:
    model: str
    cases: tuple[Case, ...]
    measures: tuple[str, ...]
    factors: tuple[str, ...]  # the grid's factor names, in file order
    name: str
    raw: dict  # the file's content, as read
    dtype: str = "fp32"  # fp32, fp16 or bf16

    def words(self) -> list[tuple[Case, list[str]]]:
        """Each distinct (prompts, options) once, for the word checks that need the model's tokenizer."""
        seen, out = set(), []
        for case in self.cases:
            key = (case.source, case.target, repr(case.options))
            if key not in seen:
                seen.add(key)
                out.append((case, [case.source, case.target]))
        return out


def _fail(where: str, message: str) -> InputError:
    return InputError(f"{where}: {message}")


def _known(mapping, allowed, where: str) -> None:
    if not isinstance(mapping, Mapping):
        raise _fail(where, f"expected a mapping of names to values, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            raise _fail(where, f"unknown name {key!r}: expected one of {', '.join(allowed)}")


def _value(name: str, value):
    """A value as the options dataclasses take it: lists become tuples, mappings of word spans stay mappings,
    `reweight: {word: factor}` becomes pairs."""
    if name == "reweight" and isinstance(value, Mapping):
        return tuple((str(k), v) for k, v in value.items())
    if name == "reweight" and isinstance(value, list):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if isinstance(value, list):
        return tuple(value)
    return value


MAX_STUDY_BYTES = 1_000_000  # a study file larger than this is refused unread
MAX_CASES = 10_000  # a study that expands to more cases is refused before any case is built


def _yaml_loader():
    """PyYAML's safe loader without aliases (`*name`): a few bytes of nested aliases expand to gigabytes."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, f"found the alias *{event.anchor}: a study file may not "
                                                  "use YAML aliases", event.start_mark)
            return super().compose_node(parent, index)

    return NoAliases


def read(path: str | Path) -> dict:
    """The study file's content (YAML or JSON by extension; YAML also reads JSON): UTF-8 (or UTF-16 with its byte
    order mark), at most MAX_STUDY_BYTES, no YAML aliases."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no study file at {path}: expected a YAML or JSON file")
    size = path.stat().st_size
    if size > MAX_STUDY_BYTES:
        raise InputError(f"the study {path} is {size:,} bytes; expected a study file of at most {MAX_STUDY_BYTES:,}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-16") if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"the study {path} is not UTF-8 text ({e.reason} at byte {e.start}); expected a YAML or JSON "
                         "file saved as UTF-8") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506  (a safe loader, without aliases)
    except Exception as e:  # the parsers' own messages name the line
        message = " ".join(str(e).split())
        raise InputError(f"cannot read the study {path}: {message}") from None
    if not isinstance(data, dict):
        raise InputError(f"the study {path} must be a mapping (model, edits, grid, ...), got {type(data).__name__}")
    return data


def parse(data: dict, where: str = "the study") -> Study:
    """Every case of the study, each option checked (unknown names, bad values, empty grid factors) before any work."""
    _known(data, TOP_KEYS, where)
    model = data.get("model", "shapes")
    if not isinstance(model, str) or not model:
        raise _fail(where, f"model must be a bundled name, a folder or a hub id, got {model!r}")
    dtype = data.get("dtype", "fp32")
    if dtype not in DTYPES:
        raise _fail(where, f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    base_gen = data.get("generation") or {}
    _known(base_gen, GENERATION_FIELDS, f"{where}, generation")
    base_opts = data.get("options") or {}
    _known(base_opts, EDIT_FIELDS, f"{where}, options")
    edits = data.get("edits")
    if not isinstance(edits, list) or not edits:
        raise _fail(where, "expected `edits:`, a list of at least one {source, target} edit")
    grid = data.get("grid") or {}
    if "grid" in data and not grid:
        raise _fail(where, "the grid is empty: give each factor a list of values, or leave `grid:` out")
    _known(grid, FACTORS, f"{where}, grid")
    for factor, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _fail(f"{where}, grid", f"factor {factor!r} needs a non-empty list of values, got {values!r}")
    measures = data.get("measures", list(MEASURES))
    if not isinstance(measures, list) or not measures or any(m not in MEASURES for m in measures):
        raise _fail(where, f"measures must be a non-empty list of {', '.join(MEASURES)}, got {measures!r}")
    name = str(data.get("name") or "study")

    combinations = math.prod(len(v) for v in grid.values())
    targets_per_edit = [len(e["targets"]) if isinstance(e, dict) and isinstance(e.get("targets"), list) else 1
                        for e in edits]
    total = combinations * sum(targets_per_edit)
    if total > MAX_CASES:
        raise _fail(where, f"it expands to {total:,} cases ({sum(targets_per_edit)} edits x {combinations:,} grid "
                    f"combinations); expected at most {MAX_CASES:,}: split it into several studies")
    cases, ids = [], set()
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    for e, spec in enumerate(edits):
        at = f"{where}, edit {e + 1}"
        _known(spec, ("source", "target", "targets", "options", "generation"), at)
        if not isinstance(spec.get("source"), str) or not spec["source"].strip():
            raise _fail(at, f"expected a source prompt, got {spec.get('source')!r}")
        targets = spec.get("targets", [spec["target"]] if "target" in spec else None)
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t.strip() for t in targets):
            raise _fail(at, "expected `target:` (a prompt) or `targets:` (a list of prompts)")
        own = spec.get("options") or {}
        _known(own, EDIT_FIELDS, f"{at}, options")
        own_gen = spec.get("generation") or {}
        _known(own_gen, GENERATION_FIELDS, f"{at}, generation")
        for target in targets:
            for combo in combos:
                opts = {**base_opts, **own, **{k: v for k, v in combo.items() if k in EDIT_FIELDS}}
                gen = {**base_gen, **own_gen, **{k: v for k, v in combo.items() if k in GENERATION_FIELDS}}
                control, local = combo.get("control", "p2p"), combo.get("local_blend", True)
                label = f"{at}" + (f", grid {combo}" if combo else "")
                if control not in CONTROLS:
                    raise _fail(label, f"control must be one of {', '.join(CONTROLS)}, got {control!r}")
                if not isinstance(local, bool):
                    raise _fail(label, f"local_blend must be true or false, got {local!r}")
                if not local:
                    opts = {**opts, "blend": (), "subtract": ()}
                if control == "none":  # plain generation: no edit option changes its pictures
                    opts = {}
                try:
                    options = EditOptions(**{k: _value(k, v) for k, v in opts.items()})
                    generation = GenerationOptions(**{k: _value(k, v) for k, v in gen.items()})
                except P2PError as err:
                    raise _fail(label, str(err)) from None
                except TypeError as err:
                    raise _fail(label, f"a value has the wrong type ({err})") from None
                case = Case(len(cases), spec["source"], target, combo, options, generation, control, model, dtype)
                if control == "none" and case.id in ids:
                    continue  # the same plain pictures as a case already listed
                if case.id in ids:
                    raise _fail(label, "a case with exactly the same settings is already listed (a repeated edit "
                                "or grid value)")
                cases.append(case)
                ids.add(case.id)
    return Study(model, tuple(cases), tuple(measures), tuple(grid), name, data, dtype)


def load(path: str | Path) -> Study:
    """A study file, its model folder (when a relative path) read from the study's own folder, not the current one."""
    from .loading import BUNDLED

    path = Path(path)
    data = read(path)
    model = data.get("model")
    if isinstance(model, str) and model and model not in BUNDLED and not Path(model).expanduser().is_absolute() \
            and not model.startswith("~"):
        beside = (path.parent / model).resolve()
        hub_id = model.count("/") == 1 and not model.startswith(".") and not Path(model).exists()  # owner/name
        if beside.is_dir():
            data = {**data, "model": str(beside)}
        elif not hub_id:
            raise InputError(f"the study {path.name}: model {model!r} is read relative to the study's folder, and "
                             f"{beside} is not a folder; expected a bundled name, a folder (relative to the study or "
                             "absolute) or a hub id")
    return parse(data, f"the study {path.name}")
