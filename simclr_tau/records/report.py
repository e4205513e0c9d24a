"""The comparison's files: ``report.html`` (tables and PNGs in one self-contained page) and CSVs."""

from __future__ import annotations

import base64
import csv
import html
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from simclr_tau.records.run_data import RunData
from simclr_tau.records.tables import BEST, TABLE_NOTE


# Click a header to sort by that column (numbers as numbers, "—" last); click again to reverse.
SORT_JS = """<script>
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], asc = th.dataset.asc !== '1';
    var key = function (tr) { var t = tr.cells[col].textContent.replace('★', '').trim(), n = parseFloat(t);
                              return isNaN(n) ? (t === '—' ? null : t) : n; };
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === null || y === null) return x === y ? 0 : (x === null ? 1 : -1);
      return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
    }).forEach(function (tr) { body.appendChild(tr); });
    th.dataset.asc = asc ? '1' : '0';
  });
});
</script>"""


def _cell(c: Any) -> str:
    text = html.escape(str(c))
    return f"<td><b>{text}</b></td>" if text.endswith(BEST) else f"<td>{text}</td>"


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], sortable: bool = False,
                marked: Sequence[bool] = ()) -> str:
    """A table inside a container that scrolls sideways (the page itself never overflows); the rows ``marked``
    True are baselines (greyed, in italics)."""
    head = "".join(f"<th title='click to sort'>{html.escape(str(h))}</th>" if sortable else f"<th>{html.escape(str(h))}</th>"
                   for h in headers)
    marked = list(marked) + [False] * (len(rows) - len(marked))
    body = "".join(("<tr class='baseline'>" if m else "<tr>") + "".join(_cell(c) for c in r) + "</tr>"
                   for r, m in zip(rows, marked))
    cls = " class='sortable'" if sortable else ""
    return f"<div class='scroll'><table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def write_html(path: Path, runs: Sequence[RunData], table: tuple, diff_table: tuple, images: Sequence[tuple],
               notes: Sequence[str], setup: str = "", warning: Optional[str] = None) -> Path:
    """The self-contained report: the setup the runs share, a mixed-datasets warning, the sortable metrics
    table (best per column in bold, baseline rows greyed), the config differences and the PNGs as data URIs."""
    style = ("body{font-family:sans-serif;margin:2em;color:#222;max-width:100%}table{border-collapse:collapse}"
             ".scroll{overflow-x:auto;margin:1em 0;max-width:100%}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:13px;vertical-align:top}"
             "td:first-child{max-width:16em;overflow-wrap:anywhere}th{background:#f3f3f3}"
             "table.sortable th{cursor:pointer}.warning{background:#fff3cd;border:1px solid #e0b000;padding:0.5em}"
             "tr.baseline td{background:#f6f6f6;color:#555;font-style:italic}"
             "img{max-width:100%;border:1px solid #eee;margin:0.5em 0}")
    marks = [bool(r.baseline) for r in runs]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>simclr-tau comparison</title>"
             f"<style>{style}</style></head><body><h1>simclr-tau run comparison</h1>",
             f"<p>{_count(runs)}, generated {html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
             f"<p><b>{html.escape(setup)}</b></p>" if setup else "",
             f"<p class='warning'>warning: {html.escape(warning)}</p>" if warning else "",
             _html_table(["run", "source"], [[r.name, r.source] for r in runs], marked=marks),
             "<h2>Final metrics</h2>", _html_table(*table, sortable=True, marked=marks),
             f"<p><small>{html.escape(TABLE_NOTE)}</small></p>",
             "<h2>Config differences</h2>",
             _html_table(*diff_table) if diff_table[1] else "<p>identical configs (apart from run names)</p>",
             "<h2>Plots</h2>"]
    for title, png in images:
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        parts.append(f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append(SORT_JS + "</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _count(runs: Sequence[RunData]) -> str:
    n_base = sum(1 for r in runs if r.baseline)
    return f"{len(runs) - n_base} runs" + (f" and {n_base} baseline{'s' if n_base > 1 else ''}" if n_base else "")


def write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(headers)
        w.writerows([["" if v is None else v for v in r] for r in rows])
