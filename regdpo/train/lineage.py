"""Which checkpoints a run may continue from: its lineage and its shard set.

The lineage is a hash of what shapes the trajectory: the model (its settings and files) and the
train settings, without max_steps and without runtime fields (processes, accumulation split,
workers, checkpoint cadence, how the reference is held). A checkpoint continues only in its
own lineage:

- same shard set: continue where it stopped, up to segment_start + max_steps. So an
  interrupted run resumes exactly, and raising max_steps continues a finished run;
- the shard set grew (every shard it trained on is still there, unchanged, and new shards were
  added by encode): a new segment starts at the checkpoint's step, with a new data order over
  all pairs; max_steps counts the steps on that set (warmup and cosine start again);
- a shard was removed or rewritten, or the lineage differs: no continuation (start fresh).
"""

from __future__ import annotations

from pathlib import Path

from regdpo.config import Config, fingerprint_payload
from regdpo.hashing import short_hash
from regdpo.train.checkpoint import TrainState, latest_checkpoint
from regdpo.train.loader import PairSource, shard_set_relation


def lineage_of(cfg: Config, spec) -> str:
    train = fingerprint_payload(cfg.train)
    train.pop("max_steps")
    payload = {"model": fingerprint_payload(cfg.model), "weights": spec.fingerprint(), "train": train}
    return short_hash(payload)


def fresh_state(lineage: str, source: PairSource) -> TrainState:
    return TrainState(lineage=lineage, shards=source.identity(),
                      history=[{"segment": 0, "start_step": 0, "shards": source.digest(), "num_pairs": source.num_pairs}])


def continuation(checkpoint: Path, lineage: str, source: PairSource) -> str:
    """"same", "grew" or why the checkpoint cannot be continued (a sentence)."""
    state = TrainState.read(checkpoint)
    if state.lineage != lineage:
        return "it was trained with other settings or another model"
    relation = shard_set_relation(state.shards, source)
    if relation == "changed":
        return "shards it trained on were removed or rewritten since"
    return relation


def resume_state(checkpoints: Path, lineage: str, source: PairSource) -> tuple[TrainState, Path | None]:
    """The state to start from and the checkpoint to load (None: a fresh start at step 0)."""
    latest = latest_checkpoint(checkpoints)
    if latest is None:
        return fresh_state(lineage, source), None
    how = continuation(latest, lineage, source)
    if how not in ("same", "grew"):
        raise ValueError(f"{latest} cannot be continued: {how}; train into an empty folder (the train stage starts "
                         "fresh by itself)")
    state = TrainState.read(latest)
    if how == "grew":
        state.segment += 1
        state.segment_start = state.step
        state.shards = source.identity()
        state.nonfinite_run = 0
        state.history.append({"segment": state.segment, "start_step": state.step, "shards": source.digest(),
                              "num_pairs": source.num_pairs})
    return state, latest
