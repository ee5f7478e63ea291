"""Train stage: Reg-DPO on the train split of the pair shards.

Reads shards/; writes train/metrics.jsonl, train/checkpoints/step-NNNNNN/, train/final/.
An interrupted run resumes from its latest checkpoint when rerun with the same settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from regdpo.config import Config
from regdpo.data.shards import shard_urls
from regdpo.stages.common import load_spec
from regdpo.train.loop import train


def build(cfg: Config, workdir: Path, out: Path) -> dict[str, Any]:
    urls = shard_urls(workdir / "shards", "train")
    spec = load_spec(cfg)
    return train(cfg, spec, urls, out)
