"""Train stage: Reg-DPO on the train split of the pair shards.

Reads shards/; writes train/metrics.jsonl, train/checkpoints/step-NNNNNN/, train/final/.
An interrupted run resumes from its latest checkpoint when rerun with the same settings.
"""

from __future__ import annotations

import shutil
from typing import Any

from regdpo.stages.runner import StageContext
from regdpo.data.shards import shard_urls
from regdpo.stages.common import load_spec
from regdpo.train.loop import train


def build(ctx: StageContext) -> dict[str, Any]:
    if ctx.interrupted_fingerprint is not None and ctx.interrupted_fingerprint != ctx.fingerprint:
        # an interrupted run with other settings or inputs: its checkpoints do not apply
        for item in ctx.out.iterdir():
            if item.name != "partial.json":
                shutil.rmtree(item) if item.is_dir() else item.unlink()
    urls = shard_urls(ctx.workdir / "shards", "train")
    spec = load_spec(ctx.cfg)
    return train(ctx.cfg, spec, urls, ctx.out)
