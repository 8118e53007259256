"""Interactive views of a DataFrame for the offline report: a sortable, filterable table and a
scatter of any two numeric columns the reader picks (coloured by a third).

Both are generic over the frame's columns. The table is :func:`tgeom.report.html.table` (its
sort and filter script is on every page); the scatter's data travels as JSON inside the page and
:data:`SCATTER_JS` draws it with the inlined plotly.js, so the page stays self-contained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tgeom.report import html as H

if TYPE_CHECKING:
    import pandas as pd

SCATTER_JS = """
document.querySelectorAll('.frame-scatter').forEach(function(box){
  var data=JSON.parse(box.querySelector('script.scatter-data').textContent);
  var plot=box.querySelector('.scatter-plot');
  var pick={x:box.querySelector('select.scatter-x'),y:box.querySelector('select.scatter-y'),
    color:box.querySelector('select.scatter-color')};
  function draw(){
    var c=pick.color.value,marker={size:9,line:{width:0.5,color:'#334'}};
    if(c){marker.color=data.columns[c];marker.colorscale='Viridis';marker.showscale=true;
      marker.colorbar={title:{text:c}};}
    var trace={type:'scatter',mode:'markers',x:data.columns[pick.x.value],
      y:data.columns[pick.y.value],text:data.labels,customdata:data.links,marker:marker,
      hovertemplate:'%{text}<br>x %{x:.4g}<br>y %{y:.4g}<extra></extra>'};
    Plotly.react(plot,[trace],{height:480,margin:{l:60,r:20,t:10,b:50},
      xaxis:{title:{text:pick.x.value}},yaxis:{title:{text:pick.y.value}}},
      {displaylogo:false});
  }
  [pick.x,pick.y,pick.color].forEach(function(s){s.addEventListener('change',draw);});
  draw();
  plot.on('plotly_click',function(ev){
    var p=ev.points&&ev.points[0];if(p&&p.customdata)location.hash=p.customdata;});
});
"""


def numeric_columns(frame: pd.DataFrame) -> list[str]:
    """The frame's numeric columns, in frame order: a numeric dtype (booleans excluded), or
    numbers with missing values as None (how ``results_frame`` gives NaN)."""
    import pandas as pd

    def numeric(column: pd.Series) -> bool:
        if pd.api.types.is_bool_dtype(column):
            return False
        if pd.api.types.is_numeric_dtype(column):
            return True
        return all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in column
        )

    return [str(c) for c in frame.columns if numeric(frame[c])]


def frame_table(
    frame: pd.DataFrame,
    table_id: str,
    *,
    token_columns: Sequence[str] = (),
    row_links: Sequence[str | None] | None = None,
    placeholder: str = "filter: words, or column>0.5 column=3 ...",
) -> str:
    """The whole frame as a sortable, filterable table (one row per frame row); the columns
    named in ``token_columns`` are shown as verbatim token strings."""
    columns = [str(c) for c in frame.columns]
    rows = frame.astype(object).where(frame.notna(), float("nan")).values.tolist()
    return H.table(
        rows,
        columns,
        table_id=table_id,
        searchable=True,
        token_columns=[columns.index(c) for c in token_columns],
        scroll=True,
        row_links=row_links,
        placeholder=placeholder,
    )


def frame_scatter(
    frame: pd.DataFrame,
    fig_id: str,
    caption: str,
    *,
    labels: Sequence[str],
    x: str,
    y: str,
    color: str | None = None,
    links: Sequence[str | None] | None = None,
) -> str:
    """A scatter of two of the frame's numeric columns with pickers for x, y and the colour
    (``""``: none). ``labels``: one hover line per row; ``links``: per row, the fragment a click
    on its point goes to. Missing values are left out of the plot."""
    columns = numeric_columns(frame)
    for name in (x, y, *([color] if color else [])):
        if name not in columns:
            raise ValueError(f"{name!r} is not a numeric column of the frame: {columns}")
    data = {
        "columns": {c: [_finite(v) for v in frame[c].tolist()] for c in columns},
        "labels": [str(label) for label in labels],
        "links": list(links) if links is not None else None,
    }

    def picker(axis: str, chosen: str | None, optional: bool = False) -> str:
        options = [("", "none")] if optional else []
        options += [(c, c) for c in columns]
        items = "".join(
            f'<option value="{H.esc(v)}"{" selected" if v == (chosen or "") else ""}>'
            f"{H.esc(t)}</option>"
            for v, t in options
        )
        return (
            f'<label>{H.esc(axis)} <select class="scatter-{H.esc(axis)}" '
            f'aria-label="scatter {H.esc(axis)}">{items}</select></label> '
        )

    return (
        f'<figure id="{H.esc(fig_id)}" class="frame-scatter">'
        f'<div class="pickers">{picker("x", x)}{picker("y", y)}{picker("color", color, True)}'
        f'</div><div class="scatter-plot" id="{H.esc(fig_id)}-plot"></div>'
        f'<script type="application/json" class="scatter-data">{script_json(data)}</script>'
        f"<figcaption>{H.esc(caption)}</figcaption></figure>"
    )


def script_json(data: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` are written as
    ``\\u`` escapes, so no string in it can close the element or open a comment."""
    text = json.dumps(data, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(value: Any) -> float | None:
    """A finite number as a float; NaN, inf and None as None (plotly leaves the point out)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None
