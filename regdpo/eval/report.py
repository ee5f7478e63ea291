"""eval/report.md and a self-contained eval/report.html: what a person reads after a run.

Both are rendered from one list of blocks, so they say the same thing: the verdict table first,
then the training curves, the per-timestep errors, the samples, the distribution metrics and the
configuration. The HTML embeds its images (and the sample grid video when small) as base64
data URIs, so it can be mailed or attached as one file.
"""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regdpo.eval.stats import BETTER, COMPONENT, MARGIN, SAME, WORSE, Interval, role_of

MAX_EMBEDDED_VIDEO = 8 * 2**20  # bytes; larger grids are linked, not embedded

TINY_WARNING = ("This run uses the tiny random-init preset (model.preset: tiny): the numbers below exercise the "
                "pipeline and say nothing about video quality. Its samples are not expected to look like video.")
# Real video denoisers have billions of parameters (Wan 2.1: 1.3B and 14B); anything under this
# is a toy whatever its origin (the tiny preset, or a tiny model saved as a directory).
TOY_PARAMETERS = 50_000_000


def toy_warning(preset: str | None, num_parameters: int) -> str | None:
    """The report's first line for a toy model, or None for a real one."""
    if preset == "tiny":
        return TINY_WARNING
    if num_parameters < TOY_PARAMETERS:
        return (f"This model's denoiser has {num_parameters / 1e6:.2g}M parameters, a toy size (real video models have "
                "billions): the numbers below exercise the pipeline and say nothing about video quality.")
    return None


def doc_link(name: str, report_dir: Path) -> str | None:
    """A relative link from `report_dir` to docs/<name> of the checkout this code runs from, or
    None when the package is installed without its docs."""
    doc = Path(__file__).resolve().parents[2] / "docs" / name
    return os.path.relpath(doc, Path(report_dir).resolve()) if doc.is_file() else None


def fmt(x: float | None, digits: int = 4) -> str:
    """`digits` significant digits; "—" for a missing value (None or NaN), "inf" for an unbounded one."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def fmt_signed(x: float, digits: int = 4) -> str:
    return f"{x:+.{digits}g}" if math.isfinite(x) else str(x)


@dataclass
class Block:
    kind: str  # h1 | h2 | p | warn | table | img | video | code | list
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    path: str = ""  # img / video: relative to the report's folder


def interval_of(row: dict[str, Any]) -> Interval:
    return Interval(**row["interval"])


def change_cell(row: dict[str, Any], digits: int = 4) -> str:
    """'-0.4594 [-0.5274, -0.3914]': a verdict row's change and its interval (or why it has none),
    to `digits` significant digits."""
    iv = interval_of(row)
    if not (math.isfinite(iv.low) and math.isfinite(iv.high)):
        return f"{fmt_signed(row['change'], digits)} (no interval: {iv.note or 'none'})"
    return f"{fmt_signed(row['change'], digits)} [{fmt(iv.low, digits)}, {fmt(iv.high, digits)}]"


_DIRECTION = {"denoise_error_real": {BETTER: "fell: real clips fit better", WORSE: "rose: real clips fit worse"},
              "denoise_error_negative": {BETTER: "rose", WORSE: "fell"}}


def reading(row: dict[str, Any]) -> str:
    """The verdict column: a plain verdict for what decides; for a component of the margin, only
    the direction it moved (it is part of s, not a vote of its own)."""
    if role_of(row) == COMPONENT:
        return _DIRECTION.get(row["metric"], {}).get(row["verdict"], row["verdict"])
    return f"**{row['verdict']}**"


def verdict_table(rows: list[dict[str, Any]]) -> Block:
    """The narrow verdict table: the margin rows first, its two components under them, then the
    sample metrics (any other row, e.g. a scorer, joins those)."""
    rank = {MARGIN: 0, COMPONENT: 1}
    body = []
    for r in sorted(rows, key=lambda r: rank.get(role_of(r), 2)):
        name = f"{r['label']} (want {r['want']})"
        if role_of(r) == COMPONENT:
            name = "↳ " + name
        body.append([name, fmt(r["base"], 3), fmt(r["tuned"], 3), change_cell(r, 3), reading(r)])
    return Block("table", header=["metric", "base", "tuned", "change [95% interval]", "verdict"], rows=body)


def interval_note(rows: list[dict[str, Any]]) -> str:
    """What the intervals rest on, said once under the table instead of in every cell."""
    rests = dict.fromkeys(f"{r['interval']['n']} {r.get('unit', 'pairs')}" for r in rows)
    levels = dict.fromkeys(f"{r['interval']['confidence']:.0%}" for r in rows)
    methods = sorted({r["interval"]["method"] for r in rows if r["interval"]["method"] != "none"})
    return (f"Intervals: {', '.join(levels)}, over {' or '.join(rests)} ({'; '.join(methods) or 'none computed'}). "
            "A verdict is 'better' or 'worse' only when its interval excludes 0; ↳ rows are the two parts of the "
            "margin (s = win gap - lose gap).")


def timestep_table(per_t: list[dict[str, Any]]) -> Block:
    """Per timestep: the margin s and its two components (changes with intervals), then the errors."""
    def cell(d: dict[str, Any]) -> str:
        return change_cell({"change": d["estimate"], "interval": d}, 3)

    body = []
    for r in per_t:
        errors = "; ".join(f"{fmt(r[m]['base'], 3)} -> {fmt(r[m]['tuned'], 3)}" for m in ("real", "negative"))
        body.append([f"{r['t']:g}", cell(r["s"]) if "s" in r else "—", cell(r["real"]["change"]),
                     cell(r["negative"]["change"]), errors])
    return Block("table", header=["t", "margin s", "win gap (real)", "lose gap (negative)",
                                  "error base -> tuned (real; negative)"], rows=body)


def render_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind == "h1":
            out += [f"# {b.text}", ""]
        elif b.kind == "h2":
            out += [f"## {b.text}", ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind == "warn":
            out += [f"> **{b.text}**", ""]
        elif b.kind == "table":
            out.append("| " + " | ".join(h.replace("|", "\\|") for h in b.header) + " |")
            out.append("|" + "---|" * len(b.header))
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in b.rows]
            out.append("")
        elif b.kind == "img":
            out += [f"![{b.text}]({b.path})", ""]
        elif b.kind == "video":
            out += [f"[{b.text}]({b.path})", ""]
        elif b.kind == "code":
            out += ["```yaml", b.text.rstrip(), "```", ""]
        elif b.kind == "list":
            out += [f"- {i}" for i in b.items] + [""]
        else:
            raise ValueError(f"unknown block kind {b.kind!r}")
    return "\n".join(out)


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _inline(text: str) -> str:
    """Escape, then the only markdown the blocks use inline: **bold**."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


VERDICT_CLASS = {BETTER: "better", WORSE: "worse", SAME: "same"}
CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}.warn{background:#fff4d6;border-left:5px solid #e0a800;padding:.6em 1em}
.better{background:#dff5e1}.worse{background:#fbe0e0}.same{background:#f1f1f1}img,video{max-width:100%}
pre{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:13px}"""


def render_html(blocks: list[Block], root: Path) -> str:
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>regdpo evaluation report</title>",
           f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out.append(f"<{b.kind}>{_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "warn":
            out.append(f"<p class='warn'><b>{html.escape(b.text)}</b></p>")
        elif b.kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b.header) + "</tr>")
            for row in b.rows:
                cls = next((VERDICT_CLASS[v] for v in VERDICT_CLASS if row and row[-1] == f"**{v}**"), "")
                out.append(f"<tr class='{cls}'>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>")
            out.append("</table>")
        elif b.kind == "img":
            out.append(f"<p><img alt='{html.escape(b.text)}' src='{_data_uri(root / b.path, 'image/png')}'></p>")
        elif b.kind == "video":
            path = root / b.path
            if path.is_file() and path.stat().st_size <= MAX_EMBEDDED_VIDEO:
                out.append(f"<p>{html.escape(b.text)}<br><video controls loop muted "
                           f"src='{_data_uri(path, 'video/mp4')}'></video></p>")
            else:
                out.append(f"<p><a href='{html.escape(b.path)}'>{html.escape(b.text)}</a> (not embedded: too large)</p>")
        elif b.kind == "code":
            out.append(f"<pre>{html.escape(b.text)}</pre>")
        elif b.kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(out: str | Path, blocks: list[Block]) -> tuple[Path, Path]:
    """Write report.md and report.html into `out` (image paths in blocks are relative to it)."""
    out = Path(out)
    md, page = out / "report.md", out / "report.html"
    md.write_text(render_markdown(blocks))
    page.write_text(render_html(blocks, out))
    return md, page

