"""The comparison's files: ``report.html`` (tables and PNGs in one self-contained page) and CSVs."""

from __future__ import annotations

import base64
import csv
import html
import time
from pathlib import Path
from typing import Any, Sequence

from simclr_tau.records.run_data import RunData
from simclr_tau.records.tables import TABLE_NOTE


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(path: Path, runs: Sequence[RunData], table: tuple, diff_table: tuple, images: Sequence[tuple],
               notes: Sequence[str]) -> Path:
    style = ("body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:13px}th{background:#f3f3f3}"
             "img{max-width:100%;border:1px solid #eee;margin:0.5em 0}")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>simclr-tau comparison</title>"
             f"<style>{style}</style></head><body><h1>simclr-tau run comparison</h1>",
             f"<p>{len(runs)} runs, generated {html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
             _html_table(["run", "source"], [[r.name, r.source] for r in runs]),
             "<h2>Final metrics</h2>", _html_table(*table), f"<p><small>{html.escape(TABLE_NOTE)}</small></p>",
             "<h2>Config differences</h2>",
             _html_table(*diff_table) if diff_table[1] else "<p>identical configs (apart from run names)</p>",
             "<h2>Plots</h2>"]
    for title, png in images:
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        parts.append(f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(headers)
        w.writerows([["" if v is None else v for v in r] for r in rows])
