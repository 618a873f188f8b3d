"""A self-contained HTML page of images beside their captions (thumbnails inlined as base64)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

from PIL import Image

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.3em; } .meta { color: #666; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 1em; }
figure { margin: 0; padding: .6em; background: #fff; border: 1px solid #ddd; border-radius: 6px;
         display: flex; gap: .8em; align-items: flex-start; }
figure img { width: 128px; height: auto; flex: none; border-radius: 3px; }
.name { font-size: .8em; color: #777; word-break: break-all; }
.caption { font-size: 1.05em; margin: .2em 0; }
ol { margin: .3em 0; padding-left: 1.3em; font-size: .9em; } .score { color: #888; }
.skipped li { color: #a33; }
"""


def thumbnail_uri(image: Image.Image, size: int = 256) -> str:
    """A JPEG ``data:`` URI of ``image`` shrunk to fit ``size`` x ``size``."""
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _card(item: dict) -> str:
    name = html.escape(item["filename"])
    beams = item.get("beams") or []
    score = f' <span class="score">({beams[0]["score"]:.2f})</span>' if beams else ""
    thumb = item.get("thumbnail")  # None with thumbnail_size=0
    image = f'<img src="{html.escape(thumb)}" alt="{name}">' if thumb else ""
    lines = [f'<figure>{image}',
             f'<figcaption><div class="name">{name}</div>',
             f'<div class="caption">{html.escape(item["caption"])}{score}</div>']
    if len(beams) > 1:  # the other beams, numbered on from the best
        lines.append('<ol start="2">' + "".join(
            f'<li>{html.escape(b["caption"])} <span class="score">({b["score"]:.2f})</span></li>'
            for b in beams[1:]) + "</ol>")
    return "\n".join(lines) + "</figcaption></figure>"


def render_gallery(items: Sequence[dict], skipped: Sequence[tuple[str, str]] = (),
                   title: str = "Captions") -> str:
    """HTML for ``items`` (``filename``, ``caption``, ``thumbnail`` data URI, optional
    ``beams`` [{``caption``, ``score``}]) and the ``skipped`` (filename, reason) pairs."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta">{len(items)} image(s) captioned'
             + (f", {len(skipped)} file(s) skipped" if skipped else "") + "</p>",
             '<div class="grid">', *(_card(item) for item in items), "</div>"]
    if skipped:
        parts.append('<h2>Skipped</h2><ul class="skipped">' + "".join(
            f"<li>{html.escape(name)}: {html.escape(reason)}</li>" for name, reason in skipped)
            + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
