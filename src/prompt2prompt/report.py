"""Output folders: written in full or not at all, and self-contained HTML pages with the pictures embedded."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .errors import InputError

MARKER = ".p2p"  # in every output folder this tool writes: such a folder may be replaced whole by the next run


def check_output_folder(out: str | Path) -> Path:
    """Refuse, before any work, an output folder that cannot be written: a file, a path under a file, a place without
    write permission, or an existing folder with files this tool did not write (those are never deleted)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; expected a folder to write into (new, empty, or written by p2p)")
    if out.is_dir():
        if out.resolve() in (Path.cwd().resolve(), Path.home().resolve(), Path("/").resolve()):
            raise InputError(f"--out {out} is the current, home or root folder; expected a folder of its own")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise InputError(f"--out {out} holds files that p2p did not write; expected a new or empty folder, or "
                             "one written by p2p (which is replaced whole)")
    _check_writable(out.parent if not out.exists() else out, out)
    return out


def check_output_file(path: str | Path) -> Path:
    """Refuse, before any work, an output file that cannot be written (a folder, a path under a file, no permission)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"--out {path} is a folder; expected a file name such as inversion.safetensors")
    _check_writable(path.parent, path)
    return path


def _check_writable(folder: Path, asked: Path) -> None:
    """The folder (or, if it does not exist yet, its nearest existing ancestor) accepts a new file."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"cannot write {asked}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".p2p-probe-", dir=probe)
    except OSError as e:
        raise InputError(f"cannot write {asked}: {probe} does not accept new files ({e.strerror})") from None
    os.close(fd)
    os.unlink(name)


@contextmanager
def staged(out: str | Path, owned: bool = False) -> Iterator[Path]:
    """Yield a scratch folder beside out; on success it becomes out (an earlier p2p folder there is replaced whole),
    on failure nothing is left behind. owned: the caller owns out (the package's model folder): no marker, no check
    for foreign files."""
    out = Path(out) if owned else check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        if not owned:
            (tmp / MARKER).write_text("written by prompt2prompt; the next run with this --out replaces this folder\n")
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            out.replace(old / "previous")
        tmp.replace(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Section:
    title: str
    text: str = ""  # one or two sentences: what the pictures show
    images: list[tuple[str, Image.Image]] = field(default_factory=list)  # (caption, picture)
    table: list[tuple[str, str, str]] = field(default_factory=list)  # (measure, value, what it means)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; min-width: 160px; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: 0.85em; color: #555; max-width: 520px; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 4px 8px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } pre { background: #f6f6f6; padding: 0.5em; }
"""


def page(title: str, sections: Sequence[Section], settings: dict | None = None) -> str:
    """A self-contained HTML page: every picture is embedded as a data URI."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        if s.table:
            rows = "".join(
                f"<tr><td>{html.escape(a)}</td><td class='num'>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
                for a, b, c in s.table
            )
            parts.append(f"<table><tr><th>measure</th><th>value</th><th>meaning</th></tr>{rows}</table>")
        for caption, image in s.images:
            parts.append(f"<figure><img src='{data_uri(image)}' alt='{html.escape(caption)}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if settings:
        parts.append("<h2>Settings</h2><pre>" + html.escape(json.dumps(settings, indent=2, default=str)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
