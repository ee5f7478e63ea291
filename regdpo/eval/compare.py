"""Several runs side by side: a narrow table of verdicts (markdown), every number (CSV), one figure.

    regdpo compare runs/dpo runs/reg-dpo runs/sft --out compare/

reads each workdir's train/metrics.jsonl, train/config.yaml and eval/metrics.json (a run not
evaluated yet shows its training only) and writes compare.md, compare.csv and compare.png into
the output folder. An evaluation made before train/ (or the shards) last changed describes an
earlier model: it is flagged as stale in every output, and `regdpo compare` says so.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from regdpo.eval.headline import Headline, decide  # noqa: E402
from regdpo.eval.plots import ema, equal_series, load_metrics, series, smooth  # noqa: E402
from regdpo.eval.report import change_cell  # noqa: E402
from regdpo.eval.stats import Interval  # noqa: E402

TRAIN_KEYS = ("dgr", "r", "s", "win_gap", "lose_gap", "implicit_acc", "sft_loss", "dpo_loss")
CURVES = (("DGR", "dgr"), ("margin s", "s"), ("win gap (want < 0)", "win_gap"), ("lose gap (want > 0)", "lose_gap"),
          ("implicit accuracy", "implicit_acc"))
STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ("-", "v"), ("--", "P"), ("-.", "X"), (":", "*")]


CURRENT, STALE, NOT_EVALUATED = "current", "stale", "not evaluated"


@dataclass
class Run:
    name: str
    workdir: Path
    train_cfg: dict[str, Any]
    rows: list[dict[str, Any]]
    eval: dict[str, Any] | None
    eval_state: tuple[str, str] = (NOT_EVALUATED, "")  # (CURRENT | STALE | NOT_EVALUATED, why)

    @property
    def stale(self) -> bool:
        return self.eval_state[0] == STALE

    @property
    def settings(self) -> str:
        """Objective, β, r, learning rate and steps: 'reg-dpo, β 1000, r = DGR, lr 0.001, 200 steps'."""
        t = self.train_cfg
        parts = [t.get("objective", "?")]
        if parts[0] != "sft":  # neither β nor r plays a part in SFT
            parts.append(f"β {t['beta']:g}" if "beta" in t else "β ?")
        if self._r():
            parts.append(self._r())
        if "learning_rate" in t:
            parts.append(f"lr {t['learning_rate']:g}")
        if "max_steps" in t:
            parts.append(f"{t['max_steps']} steps")
        return ", ".join(parts)

    @property
    def setting(self) -> str:
        """The objective and its r in words: 'reg-dpo, r = 0.5·DGR', 'dpo', 'reg-dpo, r = 50'."""
        obj = self.train_cfg.get("objective", "?")
        return f"{obj}, {self._r()}" if self._r() else obj

    def _r(self) -> str | None:
        t = self.train_cfg
        if t.get("objective") != "reg-dpo":
            return None
        if t.get("r_mode") == "constant":
            return f"r = {t.get('r_constant'):g}"
        k = t.get("r_scale", 1.0)
        return "r = DGR" if k == 1 else f"r = {k:g}·DGR"


def load_run(workdir: str | Path, name: str | None = None) -> Run:
    workdir = Path(workdir)
    metrics = workdir / "train" / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: {workdir} is not a trained regdpo workdir (run train first)")
    rows, _ = load_metrics(metrics)
    cfg_path = workdir / "train" / "config.yaml"
    train_cfg = (yaml.safe_load(cfg_path.read_text()) or {}).get("train", {}) if cfg_path.is_file() else {}
    ev = workdir / "eval" / "metrics.json"
    return Run(name or workdir.name, workdir, train_cfg, rows, json.loads(ev.read_text()) if ev.is_file() else None,
               evaluation_state(workdir))


def evaluation_state(workdir: Path) -> tuple[str, str]:
    """Whether eval/ describes the model in train/ now: (CURRENT | STALE | NOT_EVALUATED, why).

    Evaluation records the fingerprints of the train and encode outputs it read (eval/stage.json
    "upstream"); training or encoding again since then changes them. A train/ rebuilt later with
    the same settings is caught by its finish time."""
    from regdpo.stages.runner import read_stage_record

    if not (workdir / "eval" / "metrics.json").is_file():
        return NOT_EVALUATED, "no eval/metrics.json: run evaluate"
    ev = read_stage_record(workdir, "evaluate")
    if ev is None:
        return STALE, "eval/ has no stage.json, so what it evaluated is unknown: rerun evaluate"
    for stage, folder in (("train", "train/"), ("encode", "shards/")):
        rec = read_stage_record(workdir, stage)
        if rec is None:
            return STALE, f"{folder} is gone since the evaluation: rerun train and evaluate"
        if ev.get("upstream", {}).get(stage) != rec["fingerprint"]:
            return STALE, f"{folder} changed since the evaluation (its settings or inputs): rerun evaluate"
    train = read_stage_record(workdir, "train")
    if train.get("finished_at", "") > ev.get("finished_at", ""):
        return STALE, f"train/ was rebuilt ({train['finished_at']}) after the evaluation ({ev['finished_at']}): rerun evaluate"
    return CURRENT, ""


def _names(workdirs: list[Path]) -> list[str]:
    names = [w.name for w in workdirs]
    if len(set(names)) < len(names):  # same folder names in different places: add the parent
        names = [f"{w.parent.name}/{w.name}" for w in workdirs]
    return names


def _final(run: Run, key: str) -> float:
    _, y = series(run.rows, key)
    return float(ema(y)[-1]) if len(y) else math.nan


def _verdicts(run: Run) -> dict[str, dict[str, Any]]:
    return {v["metric"]: v for v in (run.eval or {}).get("verdicts", [])}


def headline_of(run: Run) -> Headline | None:
    """The run's one-sentence verdict, from its evaluation and its training log (None if not evaluated)."""
    if not run.eval:
        return None
    return decide(run.eval["verdicts"], run.rows)


def table_rows(runs: list[Run]) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    """(markdown header, markdown rows, CSV records): the markdown holds the verdict, the margin
    and the real-clip error per run; the CSV every number."""
    header = ["run", "setting", "evaluation", "verdict", "margin s, held out", "real-clip error, held out"]
    md, records = [], []
    for run in runs:
        v = _verdicts(run)
        head = headline_of(run)
        state, why = run.eval_state
        rec: dict[str, Any] = {"run": run.name, "setting": run.settings, "workdir": str(run.workdir),
                               "objective": run.train_cfg.get("objective"), "beta": run.train_cfg.get("beta"),
                               "r_mode": run.train_cfg.get("r_mode"), "r_scale": run.train_cfg.get("r_scale"),
                               "r_constant": run.train_cfg.get("r_constant"),
                               "learning_rate": run.train_cfg.get("learning_rate"),
                               "max_steps": run.train_cfg.get("max_steps"), "steps": len(run.rows),
                               "evaluation": state, "evaluation_note": why,
                               "verdict": head.label if head else "", "headline": head.sentence if head else ""}
        rec.update({f"train_{k}_end": _final(run, k) for k in TRAIN_KEYS})
        verdict = (head.label + (" (stale)" if run.stale else "")) if head else "—"
        cells = [run.name, run.settings, state, f"**{verdict}**" if head else verdict,
                 *(change_cell(v[m], 3) if m in v else "—" for m in ("s", "denoise_error_real"))]
        for m, row in v.items():
            iv = Interval(**row["interval"])
            rec.update({f"{m}_base": row["base"], f"{m}_tuned": row["tuned"], f"{m}_change": row["change"],
                        f"{m}_low": iv.low, f"{m}_high": iv.high, f"{m}_n": iv.n, f"{m}_verdict": row["verdict"]})
        md.append(cells)
        records.append(rec)
    return header, md, records


def plot_runs(runs: list[Run], out: Path) -> Path:
    """Training curves of every run (moving averages) and the held-out real-clip error change."""
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for ax, (title, key) in zip(axes.flat, CURVES):
        drawn: list[tuple[str, np.ndarray]] = []
        missing = []
        log = key == "dgr" and any(len(series(r.rows, key)[1]) and np.all(series(r.rows, key)[1] > 0) for r in runs)
        for i, run in enumerate(runs):
            x, y = series(run.rows, key)
            if not len(y):
                missing.append(run.name)
                continue
            same = next((n for n, prev in drawn if equal_series(prev, y)), None)
            ls, marker = STYLES[i % len(STYLES)]
            label = f"{run.name}" + (f" (= {same})" if same else "")
            ax.plot(x, smooth(y, log), ls=ls, marker=marker, markevery=max(1, len(x) // 8), ms=4, lw=1.5,
                    label=label, color=f"C{i % 10}")
            drawn.append((run.name, y))
        if log:
            ax.set_yscale("log")
        ax.axhline(0.5 if key == "implicit_acc" else 0.0, color="grey", lw=0.8, ls=":")
        notes = (["log scale, moving average of log"] if log else []) + ([f"not logged by {', '.join(missing)}"] if missing else [])
        ax.set_title(title + (f" ({'; '.join(notes)})" if notes else ""), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _bar_real_error(axes.flat[5], runs)
    fig.suptitle("runs compared: training curves are moving averages; right, held-out error with its interval",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _bar_real_error(ax, runs: list[Run]) -> None:
    names, est, lo, hi, colors = [], [], [], [], []
    for i, run in enumerate(runs):
        v = _verdicts(run).get("denoise_error_real")
        if v is None:
            continue
        iv = v["interval"]
        names.append(run.name + (" (stale eval)" if run.stale else ""))
        colors.append(f"C{i % 10}")  # the run's colour in the curve panels
        est.append(v["change"])
        ok = math.isfinite(iv["low"]) and math.isfinite(iv["high"])
        lo.append(v["change"] - iv["low"] if ok else 0.0)
        hi.append(iv["high"] - v["change"] if ok else 0.0)
    ax.set_title("held-out real-clip error: tuned - base (want < 0)", fontsize=10)
    if not names:
        ax.text(0.5, 0.5, "no evaluated runs", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    ypos = np.arange(len(names))
    ax.barh(ypos, est, xerr=[lo, hi], color=colors, capsize=4, alpha=0.8)
    ax.set_yticks(ypos, names, fontsize=8)
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")


def compare_runs(workdirs: list[str | Path], out: str | Path = ".", names: list[str] | None = None) -> dict[str, Path]:
    """Write compare.md, compare.csv and compare.png for the runs in `workdirs` into `out`
    (runs are named after their folders unless `names` are given)."""
    if not workdirs:
        raise ValueError("compare needs at least one workdir")
    paths = [Path(w) for w in workdirs]
    if names is not None and len(names) != len(paths):
        raise ValueError(f"compare: {len(paths)} workdirs but {len(names)} names")
    runs = [load_run(w, n) for w, n in zip(paths, names or _names(paths))]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, md_rows, records = table_rows(runs)
    lines = ["# regdpo runs compared", "",
             "Held-out columns: the change tuned - base with its 95% interval. Every number (training curves' "
             "ends, every metric's interval and verdict) is in compare.csv; each run's eval/report.md has the rest.",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             *("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in md_rows), ""]
    lines += [f"- **{rec['run']}**: {rec['headline'] or 'not evaluated.'}" for rec in records]
    stale = [run for run in runs if run.stale]
    if stale:
        lines += ["", *(f"> **{run.name}: stale evaluation.** {run.eval_state[1]}; its held-out columns describe an "
                        "earlier model." for run in stale)]
    lines += ["", "![runs compared](compare.png)", ""]
    (out / "compare.md").write_text("\n".join(lines))
    fields = list(dict.fromkeys(k for rec in records for k in rec))
    with (out / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    plot_runs(runs, out / "compare.png")
    return {"markdown": out / "compare.md", "csv": out / "compare.csv", "figure": out / "compare.png"}
