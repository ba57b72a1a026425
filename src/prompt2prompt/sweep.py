"""`p2p sweep`: every case of a study (`study.py`), resumable, on one process or many through accelerate.

    p2p sweep STUDY --out DIR                                     # one process
    p2p sweep STUDY --out DIR --processes 2                       # a shortcut for the next line
    accelerate launch --multi_gpu --num_processes 2 -m prompt2prompt.sweep STUDY --out DIR

Layout of DIR: `cases/<id>/` per case (source.png, target.png, case.json: its settings, measures, seconds, or its
error), `results.jsonl` and `results.csv` (one row per case: factors and measures), `index.html` (the contact sheet:
a picture grid per factor, and a sortable table), `study.json` (the study as read).

A case's folder is written under a temporary name and renamed when complete, so a sweep that is killed leaves only
whole cases; run again, it computes the missing ones only (cases are named by their settings, see `Case.id`). A case
that fails is recorded with its error and the sweep goes on; `--retry-failed` computes failed cases again.
Processes take cases by position (the i-th process every N-th case, whatever is already done), so none is computed
twice; each generation is seeded by its case, so 1 or N processes give the same pictures when every process uses
the same number of threads (`--threads`; by default the machine's cores divided among the processes). The process
that finishes last writes the tables and the contact sheet.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, P2PError
from .study import GENERATION_FIELDS, Case, Study

CASES = "cases"
MARKER = ".p2p-sweep"  # in every sweep folder: a re-run with this --out continues the sweep


def check_sweep_folder(out: str | Path) -> Path:
    """A new or empty folder, or one a sweep wrote (continued); anything else is refused before any work."""
    from .outputs import PROBE, _check_writable

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; expected a folder for the sweep")
    foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK and not p.name.startswith(PROBE)) \
        if out.is_dir() else []  # the lock, and the other processes' probes, are not the user's
    if foreign and not (out / MARKER).exists():
        raise InputError(f"--out {out} holds files that p2p did not write ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); expected a new or empty folder, or one an earlier "
                         "sweep wrote (to continue it)")
    _check_writable(out.parent if not out.exists() else out, out)
    return out


def case_folder(out: Path, case: Case) -> Path:
    return out / CASES / case.id


def done(out: Path, case: Case, retry_failed: bool = False) -> bool:
    """Whether the case is in out already (a record that cannot be read counts as missing: it is computed again)."""
    record = case_folder(out, case) / "case.json"
    try:
        status = json.loads(record.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return False
    return not (retry_failed and status != "ok")


LOCK = ".p2p-sweep.lock"  # held (flock) by the sweep writing the folder: a second sweep on it is refused
HELD = "P2P_SWEEP_LOCK_HELD"  # set by `p2p sweep --processes N` for its processes: it holds the lock for them


STOP_WAIT = 60  # seconds a stopped parallel sweep's launcher gets to end its processes before they are killed


@contextmanager
def locked(out: Path, rank: int = 0):
    """Hold the folder's lock for the block (rank 0 only: the other processes of one sweep share it); a folder
    another sweep holds is refused."""
    import fcntl

    if rank != 0 or os.environ.get(HELD) == str(out.resolve()):
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another sweep is writing to {out}; wait for it to finish, or choose another "
                             "--out") from None
        yield
    finally:
        os.close(fd)


def _clean_leftovers(out: Path) -> None:
    """Remove temporary case folders a killed process left (their names carry its pid; none of a live process)."""
    for tmp in (out / CASES).glob(".*-p*-*"):
        pid = tmp.name.split("-p")[-1].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_settings(pipe, study: Study) -> None:
    """Every case's generation settings fit the model (image sides its multiples): refused up front, as the command
    line refuses them, instead of failing case by case."""
    from .generation import initial_latent

    seen = set()
    for case in study.cases:
        key = (case.generation.height, case.generation.width)
        if key in seen:
            continue
        seen.add(key)
        try:
            initial_latent(pipe, case.generation)
        except P2PError as err:
            raise InputError(f"the study's case {case.source!r} -> {case.target!r} ({case.generation.height}x"
                             f"{case.generation.width}): {err}") from None


def check_words(pipe, study: Study) -> None:
    """Every word the options name (blend, subtract, re-weight, per-word spans) is in its prompt, and the prompts
    can be aligned: one sentence naming the edit, before any case runs."""
    from .edits import edit_controllers

    for case, prompts in study.words():
        try:
            edit_controllers(pipe, prompts, case.options, case.generation.steps, case.generation.max_sequence_length)
        except P2PError as err:
            raise InputError(f"the study's edit {case.source!r} -> {case.target!r}: {err}") from None


# -- one case -------------------------------------------------------------------------------------------------------
def run_case(pipe, case: Case) -> tuple[list, dict]:
    """(images [source, target], {"latents": final latents, "mask": the blend mask or None, "seconds"}) of a case."""
    from .edits import edit

    start = time.perf_counter()
    if case.control == "none":
        from .generation import generate

        plain = generate(pipe, [case.source, case.target], None, case.generation, progress=False)
        images, latents, mask = plain.images, plain.latents, None
    else:
        r = edit(pipe, case.source, case.target, case.options, case.generation, vanilla=False, progress=False)
        images, latents, mask = r.controlled.images, r.controlled.latents, r.mask
    return images, {"latents": latents, "mask": mask, "seconds": time.perf_counter() - start}


def measure_case(case: Case, images, run: dict, measures: tuple[str, ...]) -> dict:
    """The study's measures that apply to this case (see `study.py`); None where one does not apply. `truth` is only
    asked for on the bundled models (see `run_sweep`): the shapes world's segmentation means nothing elsewhere."""
    import numpy as np

    from .metrics import psnr, relative_change

    out: dict = {"seconds": run["seconds"]}
    if "truth" in measures:
        pair = truth_pair(case)
        if pair is not None:
            from .measure import score_edit

            out.update({k: (None if isinstance(v, float) and math.isnan(v) else v)
                        for k, v in score_edit(pair, images[0], images[1]).to_dict().items()})
    if "blend" in measures and run["mask"] is not None:
        import torch.nn.functional as F

        mask = run["mask"][1:2].float()  # (1, 1, h, w) the edit's final blend mask, at the latent's size
        pixels = F.interpolate(mask, size=images[0].size[::-1], mode="nearest")[0, 0].numpy() > 0.5
        out["blend_mask_area"] = float(pixels.mean())
        out["psnr_outside_mask"] = psnr(images[0], images[1], ~pixels) if (~pixels).any() else None
    if "drift" in measures:
        out["latent_drift"] = relative_change(run["latents"][0], run["latents"][1])
    return {k: (float(v) if isinstance(v, (np.floating,)) else v) for k, v in out.items()}


def truth_pair(case: Case):
    """An `EditPair` when both prompts are shapes-world captions with one object's colour or shape changed."""
    from .measure import EditPair
    from .shapes import world

    try:
        a, b = world.parse_caption(case.source), world.parse_caption(case.target)
    except ValueError:
        return None
    changed = [k for k, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) != 2 or len(b) != 2 or len(changed) != 1:
        return None
    k = changed[0]
    (c0, s0), (c1, s1) = a[k], b[k]
    if s0 != s1 and c0 == c1:
        return EditPair(case.source, case.target, k, "shape", s0, s1, (s0, s1), case.generation.seed)
    if c0 != c1 and s0 == s1 and c0 and c1:
        return EditPair(case.source, case.target, k, "colour", c0, c1, (s0,), case.generation.seed)
    return None


def write_case(out: Path, case: Case, images, measures: dict | None, error: str | None = None) -> None:
    """The case's folder, whole or not at all (written beside and renamed)."""
    from .outputs import publish

    final = case_folder(out, case)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{case.id}-p{os.getpid()}-", dir=final.parent))
    try:
        for name, image in zip(("source", "target"), images or []):
            image.save(tmp / f"{name}.png")
        record = {**case.settings(), "status": "ok" if error is None else "error", "measures": measures or {},
                  "error": error}
        (tmp / "case.json").write_text(json.dumps(record, indent=2, default=str))
        publish(tmp)  # the umask's permissions, not mkdtemp's 0700
        if final.exists():  # a failed case computed again
            shutil.rmtree(final)
        tmp.replace(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the whole sweep ------------------------------------------------------------------------------------------------
def run_sweep(study: Study, out: str | Path, pipe=None, rank: int = 0, world_size: int = 1, device: str = "cpu",
              progress: bool = True, retry_failed: bool = False,
              on_case: Callable[[Case], None] | None = None, offload: str | None = None) -> dict:
    """Run this process's share of the study's cases into out (skipping those already there), then, if every case is
    done, write the tables and the contact sheet. Returns {"computed": n, "skipped": n, "failed": n, "complete": bool}.

    on_case: called after each case this process computes (tests use it to interrupt a sweep).
    offload: diffusers' CPU offloading for the model (see `loading.load_pipeline`); needs a GPU device.
    """
    import torch

    from .loading import check_offload, resolve_dtype

    dtype = resolve_dtype(study.dtype, torch.device(device))  # checked before anything is written
    check_offload(offload, torch.device(device))
    out = check_sweep_folder(out)
    fresh = not out.exists()
    try:
        with locked(out, rank):
            return _run(study, out, pipe, rank, world_size, device, dtype, offload, progress, retry_failed, on_case)
    except BaseException:
        if rank == 0:
            _leave_nothing_if_refused(out, fresh)
        raise


def _leave_nothing_if_refused(out: Path, fresh: bool) -> None:
    """A sweep refused before its study was accepted (no marker) leaves no lock, and no folder it created."""
    if (out / MARKER).exists():
        return
    (out / LOCK).unlink(missing_ok=True)
    if fresh:
        try:
            out.rmdir()
        except OSError:  # something else was put there meanwhile: left alone
            pass


def _run(study, out, pipe, rank, world_size, device, dtype, offload, progress, retry_failed, on_case) -> dict:
    from tqdm import tqdm

    mine = [c for c in study.cases if c.index % world_size == rank]
    todo = [c for c in mine if not done(out, c, retry_failed)]
    counts = {"computed": 0, "skipped": len(mine) - len(todo), "failed": 0}
    if todo:
        if pipe is None:
            from .loading import load_pipeline

            pipe = load_pipeline(study.model, device=device, dtype=dtype, offload=offload)
            pipe.set_progress_bar_config(disable=True)
        check_words(pipe, study)
        check_settings(pipe, study)
    # the study is accepted: now the folder is the sweep's. The marker comes first: the other processes of the sweep
    # check the folder as they start, and must never see a file of ours without it
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    (out / CASES).mkdir(exist_ok=True)
    _clean_leftovers(out)
    _write_atomic(out / "study.json", json.dumps(study.raw, indent=2, default=str))
    if todo:
        from .loading import BUNDLED

        measures = tuple(m for m in study.measures if m != "truth" or study.model in BUNDLED)
        bar = tqdm(todo, desc=f"sweep{f' [{rank + 1}/{world_size}]' if world_size > 1 else ''}", disable=not progress,
                   position=rank, unit="case")
        for case in bar:
            try:
                images, run = run_case(pipe, case)
                write_case(out, case, images, measure_case(case, images, run, measures))
            except P2PError as err:
                counts["failed"] += 1
                write_case(out, case, None, None, str(err))
            except Exception as err:  # noqa: BLE001  a failing case is recorded and the sweep goes on
                counts["failed"] += 1
                write_case(out, case, None, None, f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}")
            counts["computed"] += 1
            if on_case is not None:
                on_case(case)
    counts["complete"] = all(done(out, c) for c in study.cases)
    if counts["complete"]:
        write_tables(study, out)
    return counts


def records(study: Study, out: Path) -> list[dict]:
    """Every case's record, with its position and factors as in this study (an earlier study that wrote the same case
    may have listed it elsewhere)."""
    rows = []
    for c in study.cases:
        r = json.loads((case_folder(out, c) / "case.json").read_text())
        rows.append({**r, "index": c.index, "factors": c.factors})
    return rows


def write_tables(study: Study, out: Path) -> None:
    """results.jsonl, results.csv and index.html from every case's record, each written whole."""
    rows = records(study, out)
    measure_names = sorted({k for r in rows for k in r["measures"]})
    flat = []
    for r in rows:
        flat.append({"id": r["id"], "index": r["index"], "source": r["source"], "target": r["target"],
                     **{f: _cell(r["factors"].get(f)) for f in study.factors},
                     **{m: r["measures"].get(m) for m in measure_names}, "status": r["status"],
                     "error": (r["error"] or "").splitlines()[0] if r["error"] else ""})
    _write_atomic(out / "results.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in rows))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(flat[0]))
    writer.writeheader()
    writer.writerows(flat)
    _write_atomic(out / "results.csv", buf.getvalue())
    _write_atomic(out / "index.html", contact_sheet(study, out, rows, flat))


def _cell(value):
    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else value


def _write_atomic(path: Path, text: str) -> None:
    from .outputs import staged_file

    with staged_file(path) as fh:
        fh.write(text.encode())


def factor_grids(study: Study, out: Path, rows: list[dict]) -> list[tuple[str, object]]:
    """Per factor with several values: a picture grid, one row per combination of everything else (edit and the other
    factors), one column per value of the factor, each picture labelled with its value."""
    from PIL import Image

    from . import plot

    grids = []
    for factor in study.factors:
        values = study.raw["grid"][factor]
        if len(values) < 2:
            continue
        groups: dict[str, dict[str, dict]] = {}
        for r in rows:
            rest = {k: v for k, v in r["factors"].items() if k != factor}
            key = json.dumps([r["source"], r["target"], rest], sort_keys=True, default=str)
            groups.setdefault(key, {})[json.dumps(r["factors"][factor], default=str)] = r
        images, labels, row_labels = [], [], []

        def picture(record: dict | None, name: str):
            path = case_folder(out, _case_of(study, record)) / name if record else None
            return Image.open(path).convert("RGB") if path and path.exists() else Image.new("RGB", (64, 64),
                                                                                         "lightgrey")

        varies = factor in GENERATION_FIELDS  # the source picture changes with the factor: a row of sources too
        for key, by_value in list(groups.items())[:12]:  # at most 12 edits per factor
            source, target, rest = json.loads(key)
            name = "; ".join([edit_name(source, target), *(f"{k}={_cell(v)}" for k, v in rest.items())])
            cases = [by_value.get(json.dumps(v, default=str)) for v in values]
            if varies:
                row_labels += [f"{name}: source", f"{name}: edit"]
                images += [picture(r, "source.png") for r in cases] + [picture(r, "target.png") for r in cases]
                labels += [f"source, {factor}={_cell(v)}" for v in values] + [f"{factor}={_cell(v)}" for v in values]
            else:
                row_labels.append(name)
                images += [picture(next(r for r in cases if r), "source.png"), *(picture(r, "target.png")
                                                                                 for r in cases)]
                labels += ["source", *(f"{factor}={_cell(v)}" for v in values)]
        columns = len(values) + (0 if varies else 1)
        grids.append((factor, plot.grid(images, labels, columns=columns, cell=112, row_labels=row_labels,
                                        title=f"{factor}: each row one edit and its other settings" +
                                        (", its sources above its edits" if varies else ", its source first"))))
    return grids


def edit_name(source: str, target: str, limit: int = 48) -> str:
    """A row's edit in a few words: "square->triangle" for a word swap, "+blue" for added words, "same prompt" for a
    re-weight, else the edited prompt."""
    a, b = source.split(), target.split()
    if a == b:
        name = "same prompt"
    elif len(a) == len(b):
        name = ", ".join(f"{x}->{y}" for x, y in zip(a, b) if x != y)
    else:
        import difflib

        ops = difflib.SequenceMatcher(a=a, b=b).get_opcodes()
        added = [w for tag, _, _, j1, j2 in ops if tag in ("insert", "replace") for w in b[j1:j2]]
        removed = [w for tag, i1, i2, _, _ in ops if tag in ("delete", "replace") for w in a[i1:i2]]
        name = " ".join([*(f"+{w}" for w in added), *(f"-{w}" for w in removed)]) or target
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _case_of(study: Study, record: dict) -> Case:
    return study.cases[record["index"]]


_SORT = """
<script>
function sortBy(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),b=t.tBodies[0];
const asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
const key=r=>{const c=r.children[i].dataset.v??r.children[i].textContent;const n=parseFloat(c);return isNaN(n)?c:n;};
[...b.rows].sort((x,y)=>{const a=key(x),c=key(y);return (a>c?1:a<c?-1:0)*(asc?1:-1);}).forEach(r=>b.appendChild(r));}
</script>
"""


def contact_sheet(study: Study, out: Path, rows: list[dict], flat: list[dict]) -> str:
    """One self-contained page: the grid per factor, then the table of every case (click a header to sort)."""
    from PIL import Image

    from .report import _STYLE, data_uri

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study.name)}</title>",
             f"<style>{_STYLE} th {{cursor: pointer}} img.t {{width: 64px; min-width: 64px}} "
             ".wide {overflow-x: auto; max-width: 100%} .wide table {font-size: 0.8em} .wide td, .wide th "
             "{padding: 2px 4px; max-width: 16em; overflow-wrap: anywhere}</style>"
             f"{_SORT}</head>",
             f"<body><h1>{html.escape(study.name)}: {len(rows)} cases on {html.escape(study.model)}</h1>"]
    for factor, picture in factor_grids(study, out, rows):
        parts.append(f"<h2>{html.escape(factor)}</h2><figure><img src='{data_uri(picture)}' "
                     f"alt='{html.escape(factor)} grid'></figure>")
    header = [k for k in flat[0] if k not in ("index",)]
    parts.append("<h2>Every case</h2><div class='wide'><table id='cases'><thead><tr><th>source / target</th>"
                 + "".join(f"<th onclick='sortBy(this)'>{html.escape(k)}</th>" for k in header)
                 + "</tr></thead><tbody>")
    for r, f in zip(rows, flat):
        folder = case_folder(out, _case_of(study, r))
        thumbs = "".join(f"<img class='t' src='{data_uri(Image.open(folder / n))}' alt='{n}'>"
                         for n in ("source.png", "target.png") if (folder / n).exists())
        cells = "".join(f"<td class='num' data-v='{html.escape(str(_num(f[k])))}'>{html.escape(_fmt(f[k]))}</td>"
                        for k in header)
        parts.append(f"<tr><td>{thumbs}</td>{cells}</tr>")
    parts.append("</tbody></table></div><h2>Study</h2><pre>" + html.escape(json.dumps(study.raw, indent=2, default=str))
                 + "</pre></body></html>")
    return "\n".join(parts)


def _num(v):
    return "" if v is None else v


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# -- processes ------------------------------------------------------------------------------------------------------
def distributed() -> tuple[int, int, str]:
    """(rank, processes, device) under `accelerate launch` (or torchrun); (0, 1, "cpu" or "cuda") otherwise."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        return state.process_index, state.num_processes, str(state.device)
    return 0, 1, "cuda" if torch.cuda.is_available() else "cpu"


def launch(study_path: str, out: str, processes: int, extra: list[str]) -> int:
    """`p2p sweep --processes N`: the same sweep through `accelerate launch` with N processes; this process holds the
    folder's lock for them until every one has ended. Ctrl-C or SIGTERM here is passed to the launcher, which passes
    it to each process (torch's elastic agent) and waits for them; then it is raised again here (exit 130 / 143), so
    nothing writes to the folder after the command has returned."""
    import signal
    import subprocess

    from .outputs import Terminated

    folder = check_sweep_folder(out)
    # --multi_gpu also on a CPU-only machine: it starts N processes (gloo); `--cpu` would start one
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "prompt2prompt.sweep",
           study_path, "--out", out, *extra]
    fresh = not folder.exists()
    try:
        with locked(folder):
            # its own session: a Ctrl-C at the terminal reaches it once, through this process, not twice
            launcher = subprocess.Popen(cmd, env={**os.environ, HELD: str(folder.resolve())}, start_new_session=True)
            try:
                code = launcher.wait()
            except KeyboardInterrupt as stop:
                launcher.send_signal(signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
                try:
                    launcher.wait(timeout=STOP_WAIT)
                except subprocess.TimeoutExpired:  # the launcher did not end them in time: end the whole group
                    os.killpg(launcher.pid, signal.SIGKILL)
                    launcher.wait()
                raise
            if code in (130, -signal.SIGINT):  # stopped from elsewhere: the same exit as a stop here
                raise KeyboardInterrupt
            if code in (143, -signal.SIGTERM):
                raise Terminated
            return code
    finally:
        _leave_nothing_if_refused(folder, fresh)  # the processes refused the study


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="the study file (YAML or JSON): model, edits, grid, measures (see study.py)")
    p.add_argument("--out", required=True, help="folder for the cases, tables and contact sheet (a re-run with the "
                   "same folder continues where it stopped)")
    from .argtypes import whole

    p.add_argument("--threads", type=whole(0), default=0, help="torch threads per process (default: the machine's "
                   "cores divided among the processes); the same number gives the same pictures on 1 or N processes")
    p.add_argument("--retry-failed", action="store_true", help="compute the cases recorded as failed again")
    p.add_argument("--offload", default=None, choices=["model", "sequential"],
                   help="keep the model's weights on the CPU and move them to the GPU as they run (diffusers' model or "
                   "sequential CPU offload; needs a GPU) (default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    """The entry point of each process (`python -m prompt2prompt.sweep`, `accelerate launch -m ...`)."""
    parser = argparse.ArgumentParser(prog="prompt2prompt.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    from .outputs import Terminated, terminate_like_interrupt

    terminate_like_interrupt()
    try:
        run_from_args(args)
    except P2PError as err:
        print(f"p2p sweep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"p2p sweep: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; every finished case is "
              "kept, run the same command again to continue", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    return 0


def run_from_args(args, study: Study | None = None) -> dict:
    """Load the study (unless given, already read), join the processes if launched as several, run this process's
    share; print a summary."""
    import torch

    from .study import load

    study = study or load(args.study)
    if args.quiet:  # library notices and weight-loading bars too
        import diffusers
        import transformers

        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()
    from .numbers import check_threads, cores

    check_threads(args.threads)
    rank, world_size, device = distributed()
    torch.set_num_threads(args.threads or max(1, cores() // world_size))
    counts = run_sweep(study, args.out, rank=rank, world_size=world_size, device=device, progress=not args.quiet,
                       retry_failed=args.retry_failed, offload=args.offload)
    if not args.quiet:
        state = "complete: results.csv, results.jsonl, index.html written" if counts["complete"] else \
            "other processes still running"
        print(f"[{rank + 1}/{world_size}] computed {counts['computed']} (failed {counts['failed']}), already there "
              f"{counts['skipped']}; {state} in {args.out}", file=sys.stderr)
    return counts


if __name__ == "__main__":
    sys.exit(main())
