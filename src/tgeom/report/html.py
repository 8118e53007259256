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
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
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
function tgeomTerms(q){
  var out=[],re=/"([^"]*)"|(\\S+)/g,m;
  while((m=re.exec(q))!==null){out.push(m[1]!==undefined?m[1]:m[2]);}
  return out;
}
function tgeomColumn(table,name){
  var ths=table.tHead.rows[0].cells;name=name.toLowerCase();
  for(var i=0;i<ths.length;i++){
    if((ths[i].dataset.col||ths[i].textContent).trim().toLowerCase()===name)return i;}
  return -1;
}
function tgeomFilter(table,q){
  var tests=tgeomTerms(q.toLowerCase()).map(function(term){
    var m=/^([a-z_][\\w]*)(>=|<=|!=|==|=|>|<)(-?[0-9.]+(?:e[-+]?[0-9]+)?)$/.exec(term);
    var col=m?tgeomColumn(table,m[1]):-1;
    if(col<0)return function(r){return r.textContent.toLowerCase().indexOf(term)>=0;};
    var op=m[2],ref=parseFloat(m[3]);
    return function(r){
      var v=parseFloat(r.cells[col].dataset.v);if(isNaN(v))return op==='!=';
      return op==='>'?v>ref:op==='<'?v<ref:op==='>='?v>=ref:op==='<='?v<=ref:
        op==='!='?v!==ref:v===ref;};
  });
  var shown=0,rows=table.tBodies[0].rows;
  for(var i=0;i<rows.length;i++){
    var ok=tests.every(function(t){return t(rows[i]);});
    rows[i].style.display=ok?'':'none';if(ok)shown++;}
  document.querySelectorAll('.shown[data-table="'+table.id+'"]').forEach(function(s){
    s.textContent=shown+' of '+rows.length+' rows shown';});
}
document.querySelectorAll('input.search').forEach(function(box){
  box.addEventListener('input',function(){
    tgeomFilter(document.getElementById(box.dataset.table),box.value);});
});
function tgeomKey(cell){
  if(cell.dataset.v===undefined)return cell.textContent;
  var n=parseFloat(cell.dataset.v);return isNaN(n)?null:n;
}
document.querySelectorAll('table.sortable th').forEach(function(th){
  th.addEventListener('click',function(){
    var table=th.closest('table'),body=table.tBodies[0],i=th.cellIndex;
    var asc=th.getAttribute('aria-sort')!=='ascending';
    th.parentNode.querySelectorAll('th').forEach(function(o){o.removeAttribute('aria-sort');});
    th.setAttribute('aria-sort',asc?'ascending':'descending');
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=tgeomKey(a.cells[i]),y=tgeomKey(b.cells[i]);
      if(x===null||y===null)return (x===null)-(y===null);  /* missing values last */
      var c=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y));
      return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});
  });
});
document.querySelectorAll('a[data-filter]').forEach(function(a){
  a.addEventListener('click',function(){
    var id=a.getAttribute('href').slice(1);
    var box=document.querySelector('input.search[data-table="'+id+'"]');
    if(box){box.value=a.dataset.filter;tgeomFilter(document.getElementById(id),box.value);}
  });
});
function tgeomOpenTarget(){
  var id=decodeURIComponent(location.hash.slice(1)),el=id&&document.getElementById(id);
  if(el&&el.tagName==='DETAILS'){el.open=true;el.scrollIntoView();}
}
window.addEventListener('hashchange',tgeomOpenTarget);tgeomOpenTarget();
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
    row_links: Sequence[str | None] | None = None,
    placeholder: str = "search tokens, blocks, heads",
) -> str:
    """A sortable table; ``token_columns`` are shown as verbatim token strings.

    ``searchable``: a filter box above it (words match a row's text; ``column>0.5`` style terms
    compare a numeric column). ``row_links``: per row, a fragment (``#id``) the first cell links
    to. Numeric cells keep their full value in ``data-v`` for sorting and filtering.
    """
    token_set = set(token_columns)
    tid = esc(table_id) if table_id else ""
    parts = []
    if searchable and table_id:
        parts.append(
            f'<div><input class="search" data-table="{tid}" placeholder="{esc(placeholder)}"'
            f' aria-label="filter {tid}"> <span class="shown note" data-table="{tid}">'
            f"{len(rows)} rows</span></div>"
        )
    head = "".join(f'<th data-col="{esc(h)}">{esc(h)}</th>' for h in header)
    body = []
    for r, row in enumerate(rows):
        cells = []
        for i, value in enumerate(row):
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            text = token_span(str(value)) if i in token_set else esc(fmt(value))
            link = row_links[r] if row_links is not None and i == 0 else None
            if link:
                text = f'<a href="{esc(link)}">{text}</a>'
            if numeric and i not in token_set:
                cells.append(f'<td class="num" data-v="{esc(value)}">{text}</td>')
            else:
                cells.append(f"<td>{text}</td>")
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
    plotly_js = scatter_js = ""
    if with_plotly:
        from plotly.offline import get_plotlyjs

        from tgeom.report.interactive import SCATTER_JS

        plotly_js = f"<script>{get_plotlyjs()}</script>"
        scatter_js = f"<script>{SCATTER_JS}</script>"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{PAGE_CSS}</style>{plotly_js}</head><body>"
        f"<header><h1>{esc(title)}</h1></header><nav>{nav}</nav><main>{body}</main>"
        f"<script>{TABLE_JS}</script>{scatter_js}</body></html>"
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
