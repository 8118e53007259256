"""HTML building blocks for the offline report: escaping, tables, figures, the page shell.

Every string that reaches the page goes through :func:`esc` (token strings can hold ``<script>``).
Figures are embedded as data URLs (PNG) or as Plotly divs whose library is inlined once, so the
page needs no network. The only scripts are plotly.js and the small table search/sort below.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable, Sequence
from typing import Any

PAGE_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2433;
background:#f6f7f9}
header{background:#1d2433;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
nav{padding:6px 32px;background:#e9ecf2;font-size:14px}nav a{margin-right:18px;color:#1d4ed8}
main{padding:8px 32px 48px;max-width:1280px}
section{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:12px 20px;
margin:18px 0}
h2{font-size:19px;border-bottom:1px solid #e4e7ee;padding-bottom:6px}h3{font-size:16px}
figure{margin:12px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:13px;color:#4b5563;margin-top:4px;max-width:900px}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #e1e4ea;padding:3px 7px;
text-align:left}th{background:#f0f2f6;cursor:pointer;user-select:none}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.tok{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre;background:#f3f4f6;
padding:0 3px;border-radius:3px}
.scroll{max-height:460px;overflow:auto;border:1px solid #e1e4ea}
.search{margin:6px 0;padding:4px 8px;width:320px}.note{font-size:13px;color:#4b5563}
.warnings{border-left:4px solid #d97706;background:#fffbeb;padding:4px 12px;margin:8px 0}
.kv td:first-child{color:#4b5563}
.cols{display:flex;gap:36px;flex-wrap:wrap;align-items:flex-start}
"""

TABLE_JS = """
document.querySelectorAll('input.search').forEach(function(box){
  box.addEventListener('input',function(){
    var q=box.value.toLowerCase();
    var rows=document.querySelectorAll('#'+box.dataset.table+' tbody tr');
    rows.forEach(function(r){r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});
  });
});
document.querySelectorAll('table.sortable th').forEach(function(th){
  th.addEventListener('click',function(){
    var table=th.closest('table'),body=table.tBodies[0],i=th.cellIndex;
    var asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=a.cells[i].dataset.v||a.cells[i].textContent;
      var y=b.cells[i].dataset.v||b.cells[i].textContent;
      var nx=parseFloat(x),ny=parseFloat(y);
      var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});
  });
});
"""


def esc(value: Any) -> str:
    """HTML-escape any value's text (quotes included)."""
    return html.escape(str(value), quote=True)


def token_span(token: str) -> str:
    """A token string shown verbatim (escaped; whitespace visible)."""
    return f'<span class="tok">{esc(token)}</span>'


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(
    rows: Sequence[Sequence[Any]],
    header: Sequence[str],
    *,
    table_id: str | None = None,
    searchable: bool = False,
    token_columns: Iterable[int] = (),
    scroll: bool = False,
) -> str:
    """A sortable table; ``token_columns`` are shown as verbatim token strings."""
    token_set = set(token_columns)
    tid = esc(table_id) if table_id else ""
    parts = []
    if searchable and table_id:
        parts.append(
            f'<input class="search" data-table="{tid}" placeholder="search tokens, blocks, heads"'
            f' aria-label="search {tid}">'
        )
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            if i in token_set:
                cells.append(f"<td>{token_span(str(value))}</td>")
            elif isinstance(value, int | float):
                cells.append(f'<td class="num" data-v="{esc(value)}">{esc(fmt(value))}</td>')
            else:
                cells.append(f"<td>{esc(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    id_attr = f' id="{tid}"' if tid else ""
    t = (
        f'<table class="sortable"{id_attr}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )
    parts.append(f'<div class="scroll">{t}</div>' if scroll else t)
    return "".join(parts)


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(fmt(v))}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{rows}</table>'


def png_data_url(fig: Any) -> str:
    """A matplotlib figure as a PNG data URL."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def figure(src: str, caption: str, *, fig_id: str) -> str:
    """An embedded image with its one-sentence note."""
    return (
        f'<figure id="{esc(fig_id)}"><img alt="{esc(caption)}" src="{src}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def plotly_figure(fig: Any, caption: str, *, fig_id: str) -> str:
    """An interactive Plotly figure (library inlined once by :func:`page`)."""
    div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"{fig_id}-plot")
    return f'<figure id="{esc(fig_id)}">{div}<figcaption>{esc(caption)}</figcaption></figure>'


def page(title: str, sections: Sequence[tuple[str, str, str]], *, with_plotly: bool) -> str:
    """The whole page. ``sections``: ``(anchor, heading, inner_html)``; inner HTML is trusted
    (built from escaped parts)."""
    nav = "".join(f'<a href="#{esc(a)}">{esc(h)}</a>' for a, h, _ in sections)
    body = "".join(
        f'<section id="{esc(a)}"><h2>{esc(h)}</h2>{inner}</section>' for a, h, inner in sections
    )
    plotly_js = ""
    if with_plotly:
        from plotly.offline import get_plotlyjs

        plotly_js = f"<script>{get_plotlyjs()}</script>"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{PAGE_CSS}</style>{plotly_js}</head><body>"
        f"<header><h1>{esc(title)}</h1></header><nav>{nav}</nav><main>{body}</main>"
        f"<script>{TABLE_JS}</script></body></html>"
    )


def warnings_block(warnings: Sequence[str]) -> str:
    """The section's warnings, one escaped line each, or nothing when there are none."""
    if not warnings:
        return ""
    items = "".join(f"<li>{esc(line)}</li>" for line in warnings)
    return f'<div class="warnings" role="note"><strong>Warnings</strong><ul>{items}</ul></div>'


def json_block(data: Any) -> str:
    """Pretty JSON shown as escaped text."""
    return f"<pre>{esc(json.dumps(data, indent=1))}</pre>"
