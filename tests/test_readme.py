"""The docs run as written (README.md and docs/*.md): every `p2p` line of the commands table on each family it names
(the bundled `shapes` as written, each tiny pipeline with `--model FOLDER`), every `p2p` line of a code block and every
Python block on the bundled model, and the table of shared flags is the parser's.

`python tests/test_readme.py` prints the flags table as the parser has it (to paste between its markers).
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from prompt2prompt.cli import build_parser, main
from prompt2prompt.families import FAMILIES
from prompt2prompt.testing import KINDS

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FLAGS = ("--model", "--steps", "--guidance", "--seed", "--height", "--width", "--device", "--dtype", "--offload",
         "--out", "--quiet")
COMMANDS = ("attend", "edit", "swap-analysis", "invert", "demo", "sweep", "ui")
NOT_RUN = ("ui",)  # serves a page until stopped: parsed here, its page tested in a real browser (test_ui.py)


def _between(name: str) -> str:
    """The block between <!-- name --> and <!-- /name --> in whichever page holds it (exactly one must)."""
    found = [m.group(1) for page in PAGES
             for m in re.finditer(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", page.read_text(), re.S)]
    assert len(found) == 1, f"expected one <!-- {name} --> block in README.md and docs/, found {len(found)}"
    return found[0]


def _subparsers() -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


def flags_table() -> str:
    """The shared flags each command has, as the parser defines them."""
    subs = _subparsers()
    options = {name: {s for a in subs[name]._actions for s in a.option_strings} for name in COMMANDS}
    lines = ["| flag | " + " | ".join(COMMANDS) + " |", "| --- |" + " --- |" * len(COMMANDS)]
    for flag in FLAGS:
        lines.append(f"| `{flag}` | " + " | ".join("yes" if flag in options[c] else "-" for c in COMMANDS) + " |")
    return "\n".join(lines) + "\n"


def test_the_flags_table_is_the_parsers():
    assert _between("flags") == flags_table(), "the docs' flags table; the parser's:\n" + flags_table()


def _rows() -> list[tuple[str, str, str]]:
    """(command, families, what it writes) of each row of the commands table."""
    rows = []
    for line in _between("commands").splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        command = re.fullmatch(r"`(p2p .*)`", cells[0])
        assert command and len(cells) == 3, f"a commands row is `p2p ...` | families | what it writes: {line}"
        rows.append((command.group(1), cells[1], cells[2]))
    return rows


def _kinds(families: str) -> list[str]:
    """The models a row names: the bundled `shapes` (an SD 1.x) and the tiny pipeline of each family."""
    shapes = FAMILIES["sd1"]  # what the bundled model is
    chosen = {"all": lambda f: True, "invertible": lambda f: f.invertible,
              "flowedit": lambda f: f.flowedit is not None, "concepts": lambda f: f.concepts is not None,
              "shapes": None}
    assert families in chosen, f"families column: expected one of {', '.join(chosen)}, got {families!r}"
    if families == "shapes":
        return ["shapes"]
    return ["shapes"] * chosen[families](shapes) + [k for k in KINDS if chosen[families](FAMILIES[k])]


def _checkout(tmp_path: Path, monkeypatch) -> None:
    """Run as in a checkout: the example studies beside, and photo.png, a scene of the shapes world captioned "a red
    circle and a blue square"."""
    import random

    from prompt2prompt.shapes import world

    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    world.scene_from_caption("a red circle and a blue square", random.Random(0)).image().save(tmp_path / "photo.png")


PLANS = {kind: [row for row in _rows() if kind in _kinds(row[1])] for kind in ("shapes", *KINDS)}


@pytest.mark.once
@pytest.mark.parametrize("kind", list(PLANS))
def test_every_command_of_the_table_runs_as_written(kind, tmp_path, monkeypatch, capsys):
    """Every commands row that names this model's family, in order (an edit from an inversion follows the inversion),
    exit 0 and the files its row names."""
    assert PLANS[kind], f"no command of the table names {kind}"
    _checkout(tmp_path, monkeypatch)
    folder = None
    if kind != "shapes":
        from prompt2prompt.testing import tiny_pipeline

        folder = tmp_path / "model"
        tiny_pipeline(kind, tmp_path / "tokenizers").save_pretrained(str(folder))
    subs = _subparsers()
    for command, _, writes in PLANS[kind]:
        argv = shlex.split(command)[1:]
        takes = {s for a in subs[argv[0]]._actions for s in a.option_strings}
        extra = []
        if folder is not None and "--from" not in argv:  # an edit from an inversion takes the file's model
            extra += ["--model", str(folder)]
        if "--steps" in takes and not {"--from", "--image"} & set(argv):  # an inversion's edit takes the
            extra += ["--steps", "2"]  # inversion's steps; an image's concept maps are one step
        if folder is not None and "--height" in takes and "--from" not in argv:  # a tiny pipeline at its test
            side = str(FAMILIES[kind].tiny_side)  # size (8x8 image tokens), not its pipeline's default (256 px or
            extra += ["--height", side, "--width", side]  # more on the MM-DiTs)
        code = main(argv + extra + (["--quiet"] if "--quiet" in takes else []))
        err = capsys.readouterr().err
        assert code == 0, f"{kind}: {command} exited {code}: {err}"
        out = argv[argv.index("--out") + 1] if "--out" in argv else subs[argv[0]].get_default("out")
        base = tmp_path / out if not out.endswith(".safetensors") else tmp_path
        for name in re.findall(r"`([\w.-]+\.(?:png|json|jsonl|csv|html|safetensors))`", writes):
            assert (base / name).is_file(), f"{kind}: {command} did not write {name} in {base}"


def _blocks(kind: str) -> list[tuple[Path, str]]:
    """(page, text) of every fenced block of a kind ("python"; "" for bash and unlabelled ones), in page order."""
    found = []
    for page in PAGES:
        for label, text in re.findall(r"```(\w*)\n(.*?)```", page.read_text(), re.S):
            if (label == "python") == (kind == "python"):
                found.append((page, text))
    return found


TINY = "python -m prompt2prompt.testing "  # a code block's line saving a tiny pipeline, run before the lines after it


def _code_lines() -> list[tuple[Path, str, list[str]]]:
    """(page, line, arguments) of every `p2p` command line and tiny-pipeline line of a code block, its comment left
    out."""
    return [(page, line, shlex.split(line, comments=True)[1 if line.startswith("p2p ") else 3:])
            for page, text in _blocks("") for line in text.splitlines() if line.startswith(("p2p ", TINY))]


@pytest.mark.once
def test_every_command_line_of_a_code_block_runs_as_written(tmp_path, monkeypatch, capsys):
    """On the bundled model (or the tiny pipeline a line before saved and names), in page order in one folder (an edit
    from an inversion follows it); `p2p ui` is parsed only (it serves until stopped)."""
    lines = _code_lines()
    assert {"sweep", "ui", "attend", "edit", "invert"} <= {argv[0] for _, _, argv in lines}
    _checkout(tmp_path, monkeypatch)
    parser = build_parser()
    for page, line, argv in lines:
        if line.startswith(TINY):
            from prompt2prompt import testing

            testing.main(argv)
            continue
        if argv[0] in NOT_RUN:
            parser.parse_args(argv)
            continue
        code = main(argv + ["--quiet"])
        assert code == 0, f"{page.name}: {line} exited {code}: {capsys.readouterr().err}"


@pytest.mark.once
def test_every_python_block_runs(tmp_path, monkeypatch):
    """Each page's Python blocks, as written, in a fresh folder (one namespace per page, blocks in order)."""
    blocks = _blocks("python")
    assert blocks, "the docs have no ```python block"
    monkeypatch.chdir(tmp_path)
    namespaces: dict[Path, dict] = {}
    for page, code in blocks:
        exec(compile(code, str(page.relative_to(ROOT)), "exec"), namespaces.setdefault(page, {"__name__": "docs"}))
    assert (tmp_path / "circle.png").is_file() and (tmp_path / "inv.safetensors").is_file()


if __name__ == "__main__":
    print(flags_table(), end="")
