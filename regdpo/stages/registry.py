"""Every stage declared once: name, output folder, inputs, config sections, kind.

The runner, the CLI, the Prefect flows and the docs all read this table; nothing else lists
stages. A stage's code lives in `regdpo/stages/<name>.py`.

Two kinds of stage:
- **unit stages** (ingest, generate, encode) work per clip: each unit (one manifest row's
  clip(s), one clip's negative(s), one pair) is keyed by its content, a unit done with the
  same key is never redone, and the stage's folder is updated in place by a journaled publish
  (regdpo/stages/journal.py). Their module provides `UNITS`, a `UnitStage` (units.py).
- **whole stages** (train, evaluate) build a fresh `<workdir>/.<dir>.partial/` and swap it in
  when complete. Their module provides `build(ctx: StageContext) -> dict`. A resumable whole
  stage keeps an interrupted partial with the same fingerprint and continues it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    dir: str  # published folder under the workdir (docs/DESIGN.md's layout, a public contract)
    inputs: tuple[str, ...]  # stages whose published outputs it reads
    sections: tuple[str, ...]  # config sections that shape its output (runtime fields excluded)
    summary: str  # one line for `regdpo stages`, flow descriptions and docs
    units: bool = False  # per-clip units, incremental (see module docstring)
    resumable: bool = False  # an interrupted run continues from its own checkpoints
    gpu: bool = False  # needs the accelerator for a real model (GPU pool, GPU concurrency slot)
    reads_model: bool = False  # the base model's files are an input (model.path fingerprint)


STAGE_LIST: tuple[Stage, ...] = (
    Stage("ingest", "ingest", (), ("video", "ingest"),
          "videos + captions -> normalised clips, a clip table, rejects", units=True),
    Stage("generate", "negatives", ("ingest",), ("model", "video", "generate"),
          "clips -> the base model's own videos for the same condition (negatives)",
          units=True, gpu=True, reads_model=True),
    Stage("encode", "shards", ("ingest", "generate"), ("model", "video", "encode"),
          "clips + negatives -> VAE latents and conditioning in WebDataset pair shards",
          units=True, gpu=True, reads_model=True),
    Stage("train", "train", ("encode",), ("model", "train"),
          "pair shards -> Reg-DPO fine-tuned weights (resumes an interrupted run)",
          resumable=True, gpu=True, reads_model=True),
    Stage("evaluate", "eval", ("encode", "train"), ("model", "video", "evaluate"),
          "held-out pairs + tuned weights -> metrics, samples and a report",
          gpu=True, reads_model=True),
)

STAGE: dict[str, Stage] = {s.name: s for s in STAGE_LIST}
STAGES: tuple[str, ...] = tuple(STAGE)


def get_stage(name: str) -> Stage:
    """The declaration of stage `name`; an unknown name lists the valid ones."""
    try:
        return STAGE[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}") from None
