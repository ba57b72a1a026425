"""Self-contained HTML pages with the pictures embedded (writing them is `outputs.py`'s)."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


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
