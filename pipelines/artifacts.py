"""What a stage's flow run shows in the Prefect UI: summaries, the rejects table, training
curves and the evaluation report, as Prefect artifacts read from the stage's published files.

Artifacts describe what is on disk, so a skipped (current) stage shows its outputs too. They
never fail a stage: a file that cannot be read becomes a warning line in the run's log.
Keys are fixed per kind (`regdpo-ingest-rejects`, ...) so the UI's artifact page keeps each
kind's history; each artifact is also attached to the run that made it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

MAX_TABLE_ROWS = 500  # rejects beyond this are counted, not listed (the UI table stays usable)
CURVE_POINTS = 25  # training-curve rows in the markdown table
CURVE_COLUMNS = ("loss", "dpo_loss", "sft_loss", "s", "dgr", "r", "win_gap", "lose_gap", "implicit_acc", "lr")


def key(stage: str, kind: str) -> str:
    return f"regdpo-{stage}-{kind}"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value)}`"
    return str(value)


def summary_markdown(out: dict[str, Any], workdir: str) -> str:
    state = "current, skipped" if out["skipped"] else f"ran in {out['seconds']:.1f} s"
    lines = [f"## {out['stage']}: {state}", "", f"workdir `{workdir}`, output `{out['path']}`, "
             f"fingerprint `{out['fingerprint']}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in (out.get("summary") or {}).items()]
    files = sorted(p for p in Path(out["path"]).iterdir() if not p.name.startswith(".")) if Path(out["path"]).is_dir() else []
    if files:
        lines += ["", "Files:", ""] + [f"- [{p.name}]({p.resolve().as_uri()})" for p in files[:50]]
        if len(files) > 50:
            lines.append(f"- ... and {len(files) - 50} more in `{out['path']}`")
    return "\n".join(lines) + "\n"


def rejects_table(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of ingest/rejects.parquet (at most MAX_TABLE_ROWS) and the total count."""
    import pandas as pd

    frame = pd.read_parquet(path)
    rows = [{k: _cell(v) for k, v in rec.items()} for rec in frame.head(MAX_TABLE_ROWS).to_dict("records")]
    return rows, len(frame)


def curves_markdown(metrics: Path) -> str | None:
    """A table of the training metrics at up to CURVE_POINTS steps (first and last included)."""
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of an interrupted run: not a curve point
            continue
    if not rows:
        return None
    stride = max(1, math.ceil(len(rows) / CURVE_POINTS))
    picked = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    cols = [c for c in CURVE_COLUMNS if c in rows[0]]
    lines = [f"## training curves ({len(rows)} steps; s < 0 and win_gap < 0 are what Reg-DPO wants)", "",
             f"Full log: [{metrics.name}]({metrics.resolve().as_uri()})", "",
             "| step | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + " | ".join([str(r.get("step", ""))] + [_cell(r.get(c, "")) for c in cols]) + " |" for r in picked]
    return "\n".join(lines) + "\n"


_LINK = re.compile(r"(!?\[[^\]]*\])\((?!https?:|file:|#|/)([^)\s]+)\)")


def report_markdown(report: Path) -> str:
    """report.md with its relative links made absolute file:// links (the UI has no base folder)."""
    base = report.parent.resolve()
    # Images become plain links: the browser will not load file:// images into the UI page.
    return _LINK.sub(lambda m: f"{m.group(1).lstrip('!')}({(base / m.group(2)).as_uri()})", report.read_text())


def publish(out: dict[str, Any], workdir: str, logger: logging.Logger | logging.LoggerAdapter) -> list[str]:
    """Create the artifacts for one stage's result dict; returns their keys."""
    stage, folder = out["stage"], Path(out["path"])
    made: list[str] = []

    def attempt(what: str, fn) -> None:
        try:
            made.extend(fn())
        except Exception as err:  # noqa: BLE001 - the stage's outputs are fine; say what the UI lacks
            logger.warning("%s: no %s artifact: %s", stage, what, err)

    def summary() -> list[str]:
        create_markdown_artifact(summary_markdown(out, workdir), key=key(stage, "summary"),
                                 description=f"{stage}: summary and files")
        return [key(stage, "summary")]

    def rejects() -> list[str]:
        path = folder / "rejects.parquet"
        if not path.is_file():
            return []
        rows, total = rejects_table(path)
        more = f" (first {len(rows)} of {total}; all in {path})" if total > len(rows) else f" ({path})"
        create_table_artifact(rows, key=key(stage, "rejects"), description=f"{stage}: {total} rejected inputs{more}")
        return [key(stage, "rejects")]

    def curves() -> list[str]:
        path = folder / "metrics.jsonl"
        text = curves_markdown(path) if path.is_file() else None
        if text is None:
            return []
        create_markdown_artifact(text, key=key(stage, "curves"), description=f"{stage}: loss, s, DGR, gaps per step")
        return [key(stage, "curves")]

    def report() -> list[str]:
        path = folder / "report.md"
        if not path.is_file():
            return []
        create_markdown_artifact(report_markdown(path), key=key(stage, "report"), description=f"evaluation report ({path})")
        return [key(stage, "report")]

    # Driven by the files a stage publishes, not by its name: a stage that writes
    # rejects.parquet, metrics.jsonl or report.md gets the matching view.
    for what, fn in (("summary", summary), ("rejects", rejects), ("training-curves", curves), ("report", report)):
        attempt(what, fn)
    return made
