"""Train stage: Reg-DPO on the train split of the pair shards.

Reads shards/; writes train/metrics.jsonl, train/checkpoints/step-NNNNNN/, train/final/.
An interrupted run resumes from its latest checkpoint when rerun with the same settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from regdpo.config import Config
from regdpo.stages.runner import StageContext
from regdpo.data.shards import shard_urls
from regdpo.stages.common import load_spec
from regdpo.train.loop import train


def build(ctx: StageContext) -> dict[str, Any]:
    urls = shard_urls(ctx.workdir / "shards", "train")
    spec = load_spec(ctx.cfg)
    return train(ctx.cfg, spec, urls, ctx.out)
