"""The report as one self-contained HTML page: inline CSS, images as base64 PNG, no JavaScript, no network."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1150px;color:#222;
padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.6em}
.status{padding:.5em .8em;border-radius:4px;margin:.6em 0;font-weight:600}
.finished{background:#e3f4e3;border:1px solid #8c8} .progress{background:#fff4d6;border:1px solid #db4}
.stopped{background:#fde2e2;border:1px solid #d88}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} td,th{border:1px solid #ccc;padding:.2em .5em}
th{background:#f0f0f0} table.kv th{text-align:left;white-space:nowrap} td.num{text-align:right;
font-variant-numeric:tabular-nums} code{font-size:.9em;word-break:break-all}
img{max-width:100%;height:auto;display:block;margin:.4em 0} .note{color:#666;font-size:.85em}
"""


@dataclass
class Figure:
    """One embedded PNG: file name beside the page, bytes, caption."""

    name: str
    png: bytes
    caption: str = ""


@dataclass
class Section:
    """A titled part of the page: free HTML (already escaped) and figures."""

    title: str
    html: str = ""
    figures: list[Figure] = field(default_factory=list)


def esc(x: object) -> str:
    """HTML-escaped text."""
    return html.escape(str(x), quote=True)


def fmt(v: object) -> str:
    """Numbers like C++ streams (6 significant digits, as RELION's log); NaN as an em dash."""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "—"
        return str(int(v)) if float(v).is_integer() and abs(v) < 1e9 else f"{v:g}"
    return str(v)


def img_tag(fig: Figure) -> str:
    """<img> with the PNG inlined as a data URI."""
    data = base64.b64encode(fig.png).decode("ascii")
    return (f'<figure><img alt="{esc(fig.caption or fig.name)}" data-file="{esc(fig.name)}" '
            f'src="data:image/png;base64,{data}"><figcaption class="note">{esc(fig.caption)}</figcaption></figure>')


def kv_table(rows: Sequence[tuple[str, object]]) -> str:
    """Two-column key/value table."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def data_table(df: pd.DataFrame, table_id: str, headers: dict[str, str] | None = None) -> str:
    """A DataFrame as an HTML table; each cell carries the column name as `data-col`."""
    headers = headers or {}
    head = "".join(f'<th data-col="{esc(c)}">{esc(headers.get(c, c))}</th>' for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cells = "".join(f'<td class="num" data-col="{esc(c)}">{esc(fmt(r[c]))}</td>' for c in df.columns)
        rows.append(f"<tr>{cells}</tr>")
    return f'<table id="{esc(table_id)}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def render(title: str, status: str, status_class: str, summary: Sequence[tuple[str, object]],
           sections: Sequence[Section], refresh_s: int | None = None, footer: str = "") -> str:
    """The whole page."""
    meta = f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s else ""
    head = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{meta}<title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>")
    parts = [head, f"<h1>{esc(title)}</h1>",
             f'<div class="status {esc(status_class)}" id="status">{esc(status)}</div>',
             "<h2>Summary</h2>", kv_table(summary)]
    for s in sections:
        parts.append(f"<h2>{esc(s.title)}</h2>{s.html}")
        parts.extend(img_tag(f) for f in s.figures)
    parts.append(f'<p class="note">{esc(footer)}</p></body></html>')
    return "\n".join(parts)
