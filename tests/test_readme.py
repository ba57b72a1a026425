"""The README's commands run as written: every `p2p` line of its commands table on each family it names (the bundled
`shapes` as written, each tiny pipeline with `--model FOLDER`), and its table of shared flags is the parser's.

`python tests/test_readme.py` prints the flags table as the parser has it (to paste between the README's markers).
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
README = ROOT / "README.md"
FLAGS = ("--model", "--steps", "--guidance", "--seed", "--height", "--width", "--device", "--dtype", "--offload",
         "--out", "--quiet")
COMMANDS = ("attend", "edit", "swap-analysis", "invert", "demo", "sweep", "ui")


def _between(text: str, name: str) -> str:
    match = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", text, re.S)
    assert match, f"README.md has no <!-- {name} --> ... <!-- /{name} --> block"
    return match.group(1)


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
    assert _between(README.read_text(), "flags") == flags_table(), "README's flags table; the parser's:\n" + \
        flags_table()


def _rows() -> list[tuple[str, str, str]]:
    """(command, families, what it writes) of each row of the README's commands table."""
    rows = []
    for line in _between(README.read_text(), "commands").splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        command = re.fullmatch(r"`(p2p .*)`", cells[0])
        assert command and len(cells) == 3, f"a commands row is `p2p ...` | families | what it writes: {line}"
        rows.append((command.group(1), cells[1], cells[2]))
    return rows


def _kinds(families: str) -> list[str]:
    """The models a row names: the bundled `shapes` (an SD 1.x) and the tiny pipeline of each family."""
    shapes = FAMILIES["sd1"]  # what the bundled model is
    chosen = {"all": lambda f: True, "invertible": lambda f: f.invertible,
              "flowedit": lambda f: f.flowedit is not None, "shapes": None}
    assert families in chosen, f"families column: expected one of {', '.join(chosen)}, got {families!r}"
    if families == "shapes":
        return ["shapes"]
    return ["shapes"] * chosen[families](shapes) + [k for k in KINDS if chosen[families](FAMILIES[k])]


def _picture(path: Path) -> None:
    """A rendered scene of the shapes world captioned "a red circle and a blue square"."""
    import random

    from prompt2prompt.shapes import world

    world.scene_from_caption("a red circle and a blue square", random.Random(0)).image().save(path)


PLANS = {kind: [row for row in _rows() if kind in _kinds(row[1])] for kind in ("shapes", *KINDS)}


@pytest.mark.once
@pytest.mark.parametrize("kind", list(PLANS))
def test_every_readme_command_runs_as_written(kind, tmp_path, monkeypatch, capsys):
    """Every commands row that names this model's family, in order (an edit from an inversion follows the inversion),
    exit 0 and the files its row names."""
    assert PLANS[kind], f"no README command names {kind}"
    monkeypatch.chdir(tmp_path)  # as in a checkout: the example studies beside, and a picture
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    _picture(tmp_path / "photo.png")
    folder = None
    if kind != "shapes":
        from prompt2prompt.testing import tiny_pipeline

        folder = tmp_path / "model"
        tiny_pipeline(kind, tmp_path / "tokenizers").save_pretrained(folder)
    subs = _subparsers()
    for command, _, writes in PLANS[kind]:
        argv = shlex.split(command)[1:]
        takes = {s for a in subs[argv[0]]._actions for s in a.option_strings}
        extra = []
        if folder is not None and "--from" not in argv:  # an edit from an inversion takes the file's model
            extra += ["--model", str(folder)]
        if "--steps" in takes and "--from" not in argv:  # an inversion's edit takes the inversion's steps
            extra += ["--steps", "2"]
        code = main(argv + extra + (["--quiet"] if "--quiet" in takes else []))
        err = capsys.readouterr().err
        assert code == 0, f"{kind}: {command} exited {code}: {err}"
        out = argv[argv.index("--out") + 1] if "--out" in argv else subs[argv[0]].get_default("out")
        base = tmp_path / out if not out.endswith(".safetensors") else tmp_path
        for name in re.findall(r"`([\w.-]+\.(?:png|json|jsonl|csv|html|safetensors))`", writes):
            assert (base / name).is_file(), f"{kind}: {command} did not write {name} in {base}"


@pytest.mark.once
def test_the_python_example_runs(tmp_path, monkeypatch):
    """The README's Python block, as written, in a fresh folder (it writes its own photo.png)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no ```python block"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "circle.png").is_file() and (tmp_path / "inv.safetensors").is_file()


def _other_lines() -> list[str]:
    """The README's other `p2p` command lines: those of its code blocks (a comment after `#` left out)."""
    return [m.group(1).split("#")[0].strip() for m in re.finditer(r"^(p2p [a-z].*)$", README.read_text(), re.M)]


def test_every_other_readme_command_line_parses_and_names_files_that_exist(monkeypatch):
    """The README's code-block command lines are not run here (a full study's sweep takes minutes; the page serves
    until stopped): each is parsed by the real parser, and every study file it names exists."""
    lines = _other_lines()
    assert any(line.startswith("p2p sweep") for line in lines) and any(line.startswith("p2p ui") for line in lines)
    parser = build_parser()
    monkeypatch.chdir(ROOT)
    for line in lines:
        argv = shlex.split(line)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as error:
            raise AssertionError(f"the README's {line!r} does not parse") from error
        for arg in argv:
            if arg.endswith((".yaml", ".json")) and not arg.startswith("-"):
                assert Path(arg).is_file(), f"the README's {line!r} names {arg}, which is not there"


if __name__ == "__main__":
    print(flags_table(), end="")
