"""A synthetic video world whose rules are known, so that the quality of a generated video can
be measured exactly: coloured shapes moving at constant speed and bouncing off the walls
(rules.py), clips and manifests on disk (clips.py) and a score computed from a video's pixels
and its caption (score.py)."""

from regdpo.world.clips import scene, scenes, write_world
from regdpo.world.rules import CaptionError, WorldSpec, parse_caption

__all__ = ["CaptionError", "WorldSpec", "parse_caption", "scene", "scenes", "write_world"]
