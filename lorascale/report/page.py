"""The report's index.html: run facts, the summary table and every figure with a caption.

Plain HTML with inline CSS: it must open from a laptop or a cluster scratch directory with no network,
so there are no scripts, fonts or stylesheets from elsewhere, and every link is a relative file name.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from lorascale.report.summary import format_cell, table_columns
from lorascale.report.tables import Run
from lorascale.store.schema import REPORT_GENERATOR as GENERATOR  # also marks a directory as ours


@dataclass(frozen=True)
class FigureEntry:
    """One figure on the page; its files are `<stem>.png` and `<stem>.svg` next to index.html."""

    stem: str
    title: str
    caption: str
    section: str


@dataclass
class PageContent:
    """Everything index.html shows; filled by build.py, rendered by `render_page`."""

    run: Run
    rows: list[dict[str, Any]]
    figures: list[FigureEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # figures skipped and why


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; vertical-align: top; }
th { background: #f2f2f2; } td.text, th.text { text-align: left; }
td.ref { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .95em; word-break: break-all; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .92em; color: #333; max-width: 60em; }
.files { font-size: .85em; color: #555; } .warning { background: #fff3cd; border: 1px solid #e0c068;
       padding: .6em 1em; } .notes { color: #555; font-size: .92em; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _facts(run: Run) -> str:
    manifest = run.manifest
    options = manifest.options
    side = options["side"]
    facts = [
        ("Base model", f'{_e(run.base_label)}' + ("" if run.base_label == run.base else
                                                     f' <span class="ref">{_e(run.base)}</span>')),
        ("Tuned models", str(len(run.models))),
        ("Intruder setting", f"top k = {run.k} singular vectors, max |cos| &lt; ε = {run.epsilon:g}, "
                             f"side: {_e(side)}"),
        ("Status", _e(run.status)),
        ("Started / finished", f"{_e(manifest.started or '-')} / {_e(manifest.finished or '-')}"),
        ("lorascale version", _e(manifest.lorascale_version or "-")),
    ]
    if "precision" in options:
        facts.insert(3, ("Precision", _e(options["precision"])))
    cells = "".join(f'<tr><th class="text">{name}</th><td class="text">{value}</td></tr>'
                    for name, value in facts)
    return f"<table>{cells}</table>"


def _summary_table(rows: list[dict[str, Any]], run: Run) -> str:
    if not rows:
        return "<p>No tuned models.</p>"
    columns = table_columns(rows, epsilon_symbol="ε")
    rename = {"mean_delta_rel": "mean ‖dW‖/‖W0‖", "mean_effective_rank": "mean eff. rank of dW"}
    text = {"label": "text", "update": "text", "model": "text ref"}
    head = "".join(f'<th class="{"text" if key in text else ""}">{_e(rename.get(key, header))}</th>'
                   for key, header in columns)
    body = []
    for row in rows:
        cells = [f'<td class="{text.get(key, "")}">{_e(format_cell(row.get(key)))}</td>' for key, _ in columns]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(entry: FigureEntry) -> str:
    png, svg = f"{entry.stem}.png", f"{entry.stem}.svg"
    return (f'<figure id="{_e(entry.stem)}"><a href="{_e(svg)}"><img src="{_e(png)}" '
            f'alt="{_e(entry.title)}"></a><figcaption><strong>{_e(entry.title)}.</strong> '
            f'{_e(entry.caption)} <span class="files">Files: <a href="{_e(png)}">PNG</a>, '
            f'<a href="{_e(svg)}">SVG</a>.</span></figcaption></figure>')


def render_page(content: PageContent) -> str:
    """The whole index.html as a string (UTF-8, no external resources)."""
    run = content.run
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta name="generator" content="{GENERATOR}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>lorascale report: {_e(run.base)}</title><style>{_CSS}</style></head><body>",
        f"<h1>How the fine-tunes changed {_e(run.base)}</h1>",
        "<p>Each weight matrix of every tuned model was compared with the base through its singular value "
        "decomposition. An <em>intruder dimension</em> is a top-ranked singular vector of the tuned matrix "
        "whose largest |cosine| with any base singular vector is below ε (Shuttleworth et al., "
        "arXiv 2410.21228). All numbers below come from the run's Parquet tables.</p>",
    ]
    if run.status != "complete":
        parts.append(f'<p class="warning">PARTIAL RESULTS: this run\'s status is <strong>{_e(run.status)}'
                     "</strong>. The tables do not hold every matrix, so every total below is incomplete.</p>")
    parts += ["<h2>Run</h2>", _facts(run), "<h2>Summary</h2>", _summary_table(content.rows, run)]
    section = None
    toc = []
    body = []
    for entry in content.figures:
        if entry.section != section:
            section = entry.section
            body.append(f"<h2>{_e(section)}</h2>")
        body.append(_figure(entry))
        toc.append(f'<li><a href="#{_e(entry.stem)}">{_e(entry.title)}</a></li>')
    if toc:
        parts.append(f"<h2>Figures</h2><ul>{''.join(toc)}</ul>")
    parts += body
    if content.notes:
        notes = "".join(f"<li>{_e(note)}</li>" for note in content.notes)
        parts.append(f'<h2>Not shown</h2><ul class="notes">{notes}</ul>')
    parts.append(f'<p class="notes">Made by {GENERATOR} from {_e(run.root.name or run.root)}; '
                 "works offline.</p></body></html>")
    return "\n".join(parts) + "\n"
