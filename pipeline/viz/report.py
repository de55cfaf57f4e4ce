"""The study as one self-contained HTML page: ``reports/index.html``.

Why one file with the images inside (``data:`` URIs): a person opens it offline, mails it, or
attaches it to an MLflow run, and nothing can go missing. The page is rendered by Jinja2 with
autoescaping, so a class name or a param value can never inject markup.

A report is a list of :class:`Section` in pipeline order; each holds paragraphs, tables, figures
and notes (a note is how a fallback, such as Grad-CAM instead of CAM, is said out loud).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 0; color: #1d2733; background: #fbfbfc; }
header, main { max-width: 1180px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 24px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 21px; margin-top: 40px; border-bottom: 1px solid #d6dbe1; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 24px 0 6px; }
nav ol { columns: 3; padding-left: 20px; }
.meta { color: #5b6672; font-size: 13px; }
figure { margin: 16px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e6ea; background: #fff; }
figcaption { color: #414c58; font-size: 13px; margin-top: 4px; }
table { border-collapse: collapse; margin: 12px 0; font-size: 13px; }
th, td { border: 1px solid #d6dbe1; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #eef1f4; }
td.best { font-weight: 700; background: #e6f3e6; }
.note { border-left: 4px solid #e0a800; background: #fff8e1; padding: 6px 10px; margin: 10px 0; }
details { margin: 6px 0; }
summary { cursor: pointer; color: #24527a; }
pre { background: #f1f3f5; padding: 10px; overflow-x: auto; font-size: 12px; }
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>{{ style }}</style>
</head>
<body>
<header>
<h1>{{ title }}</h1>
<p class="meta">{% for key, value in meta %}{{ key }}: <code>{{ value }}</code>
{% if not loop.last %} · {% endif %}{% endfor %}</p>
<nav><ol>{% for s in sections %}<li><a href="#{{ s.id }}">{{ s.title }}</a></li>{% endfor %}</ol>
</nav>
</header>
<main>
{% for s in sections %}
<section id="{{ s.id }}">
<h2>{{ s.title }}</h2>
{% for p in s.paragraphs %}<p>{{ p }}</p>
{% endfor %}
{% for n in s.notes %}<p class="note">{{ n }}</p>
{% endfor %}
{% for block in s.blocks %}
{% if block.folded %}<details><summary>{{ block.folded }}</summary>
{% endif %}
{% if block.kind == "heading" %}<h3>{{ block.text }}</h3>
{% elif block.kind == "text" %}<p>{{ block.text }}</p>
{% elif block.kind == "note" %}<p class="note">{{ block.text }}</p>
{% elif block.kind == "pre" %}<pre>{{ block.text }}</pre>
{% elif block.kind == "figure" %}<figure>
<img src="{{ block.src }}" alt="{{ block.alt }}">
<figcaption>{{ block.text }}</figcaption>
</figure>
{% elif block.kind == "table" %}<table>
{% if block.text %}<caption>{{ block.text }}</caption>{% endif %}
<thead><tr>{% for h in block.table.header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in block.table.rows %}{% set r = loop.index0 %}<tr>
{% for cell in row %}
{% if (r, loop.index0) in block.table.best %}<td class="best">{% else %}<td>{% endif %}
{{ cell }}</td>
{% endfor %}
</tr>
{% endfor %}</tbody>
</table>
{% endif %}
{% if block.folded %}</details>
{% endif %}
{% endfor %}
</section>
{% endfor %}
</main>
</body>
</html>
"""


@dataclass
class Table:
    """A table: header, rows of already formatted strings, and the cells to mark as best."""

    header: list[str]
    rows: list[list[str]]
    best: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class Block:
    """One item of a section, in order: heading, text, note, pre, figure or table. A block with
    ``folded`` text is shown on request: closed under that one-line summary (``<details>``),
    which needs no script, so the page stays one self-contained file."""

    kind: str
    text: str = ""
    src: str = ""
    alt: str = ""
    table: Table | None = None
    folded: str = ""


@dataclass
class Section:
    id: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(Block("heading", text))

    def text(self, text: str) -> None:
        self.blocks.append(Block("text", text))

    def note(self, text: str) -> None:
        self.blocks.append(Block("note", text))

    def pre(self, text: str) -> None:
        self.blocks.append(Block("pre", text))

    def figure(self, path: Path, caption: str, alt: str | None = None) -> None:
        """Embed the PNG at ``path``; the caption says what to look at, the alt what it is."""
        self.blocks.append(Block("figure", caption, data_uri(path), alt or caption))

    def table(self, table: Table, caption: str = "", folded: str = "") -> None:
        """A table; with ``folded``, closed under that summary until the reader opens it."""
        self.blocks.append(Block("table", caption, table=table, folded=folded))


def data_uri(path: Path) -> str:
    """The file as a ``data:`` URI, so the page needs nothing beside itself."""
    path = Path(path)
    kinds = {
        ".png": "image/png",
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".svg": "image/svg+xml",
    }
    kind = kinds.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: only PNG, JPEG and SVG figures can be embedded in the report")
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def render(title: str, meta: list[tuple[str, str]], sections: list[Section]) -> str:
    """The whole page as a string (write it with ``pipeline.io.write_text``)."""
    import jinja2

    environment = jinja2.Environment(
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    template = environment.from_string(_TEMPLATE)
    return template.render(title=title, meta=meta, sections=sections, style=_STYLE)
