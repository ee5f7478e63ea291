"""Feature extractors for the Fréchet distance between real clips and a model's samples.

`load_feature_extractor(cfg.evaluate.feature_extractor)` gives a callable that maps one uint8
video (F, H, W, 3) to feature rows (K, D):

- `proxy` (default, offline, no network weights): per-frame pixel statistics. Deterministic and
  cheap, and a PROXY: it sees colour layout, contrast and edges, nothing semantic. Reports call
  it "Fréchet distance (proxy)", never FID or FVD.
- `clip`: a transformers CLIP vision model directory; one image embedding per frame, so the
  distance is FID-style (frame-level, no motion).
- `videomae`: a transformers VideoMAE directory; one mean-pooled embedding per clip, so the
  distance is FVD-style (clip-level, sees motion; FVD proper uses an I3D network).

Model directories are read with local_files_only: nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

PROXY_THUMB = 4  # 4x4 colour thumbnail per frame


@dataclass
class FeatureExtractor:
    kind: str  # proxy | clip | videomae
    label: str  # what the Fréchet distance on these features should be called in a report
    description: str  # one sentence: what the features see
    per: str  # "frame" or "clip": one feature row per frame, or per clip
    is_proxy: bool
    fn: Callable[[np.ndarray], np.ndarray]

    def __call__(self, video_FHW3: np.ndarray) -> np.ndarray:
        video = np.asarray(video_FHW3)
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"feature extractor wants uint8 video (F, H, W, 3); got {video.dtype} {video.shape}")
        out = np.asarray(self.fn(video), dtype=np.float64)
        return out.reshape(len(out), -1)

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "label": self.label, "description": self.description, "per": self.per,
                "is_proxy": self.is_proxy}


def proxy_features(video_FHW3: np.ndarray) -> np.ndarray:
    """Per frame: a 4x4 RGB thumbnail (box filter, 48 values), per-channel standard deviation (3)
    and per-channel edge energy, mean |dx| + |dy| (3): 54 values in [0, 1] units."""
    rows = []
    for frame in video_FHW3:
        x = frame.astype(np.float64) / 255.0
        thumb = np.asarray(Image.fromarray(frame).resize((PROXY_THUMB, PROXY_THUMB), Image.BOX), np.float64) / 255.0
        edges = np.abs(np.diff(x, axis=0)).mean(axis=(0, 1)) + np.abs(np.diff(x, axis=1)).mean(axis=(0, 1))
        rows.append(np.concatenate([thumb.ravel(), x.std(axis=(0, 1)), edges]))
    return np.stack(rows)


def _check_dir(path: Path, kind: str, needs: tuple[str, ...]) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"evaluate.feature_extractor.path {path} is not a directory: point it at a local "
                                f"transformers {kind} model directory (nothing is downloaded)")
    missing = [n for n in needs if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"evaluate.feature_extractor.path {path}: missing {', '.join(missing)}; save the model "
                                "with save_pretrained and its image processor with save_pretrained into it")


def _quiet_transformers():
    # Without torchvision transformers falls back to its PIL image processors (what we use)
    # and warns on every load.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _clip_extractor(path: Path, batch_size: int, device: str) -> FeatureExtractor:
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    _check_dir(path, "CLIP", ("config.json", "preprocessor_config.json"))
    _quiet_transformers()
    model = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True).to(device).eval()
    processor = CLIPImageProcessorPil.from_pretrained(str(path), local_files_only=True)

    @torch.no_grad()
    def fn(video: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(video), batch_size):
            pixels = processor(images=list(video[i:i + batch_size]), return_tensors="pt")["pixel_values"]
            out.append(model(pixel_values=pixels.to(device)).image_embeds.float().cpu().numpy())
        return np.concatenate(out)

    return FeatureExtractor("clip", f"FID-style Fréchet distance (CLIP image embeddings, {path.name})",
                            "one CLIP image embedding per frame: appearance, not motion", "frame", False, fn)


def _videomae_extractor(path: Path, device: str) -> FeatureExtractor:
    import torch
    from transformers import VideoMAEImageProcessorPil, VideoMAEModel

    _check_dir(path, "VideoMAE", ("config.json", "preprocessor_config.json"))
    _quiet_transformers()
    model = VideoMAEModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    processor = VideoMAEImageProcessorPil.from_pretrained(str(path), local_files_only=True)
    num_frames = model.config.num_frames

    @torch.no_grad()
    def fn(video: np.ndarray) -> np.ndarray:
        # The model was trained on `num_frames` frames: sample them evenly over the clip.
        picks = np.round(np.linspace(0, len(video) - 1, num_frames)).astype(int)
        pixels = processor(list(video[picks]), return_tensors="pt")["pixel_values"]
        hidden = model(pixel_values=pixels.to(device)).last_hidden_state  # (1, tokens, D)
        return hidden.mean(dim=1).float().cpu().numpy()

    return FeatureExtractor("videomae", f"FVD-style Fréchet distance (VideoMAE clip embeddings, {path.name})",
                            f"one mean-pooled VideoMAE embedding per clip ({num_frames} frames): appearance and motion",
                            "clip", False, fn)


def load_feature_extractor(cfg, device: str = "cpu") -> FeatureExtractor:
    """The extractor for an `evaluate.feature_extractor` config (FeatureExtractorConfig)."""
    if cfg.kind == "proxy":
        return FeatureExtractor(
            "proxy", "Fréchet distance (PROXY: pixel statistics, not FID/FVD)",
            "per frame: 4x4 colour thumbnail, contrast and edge energy (54 values); sees layout and texture, "
            "nothing semantic", "frame", True, proxy_features)
    path = Path(cfg.path)
    if cfg.kind == "clip":
        return _clip_extractor(path, cfg.batch_size, device)
    if cfg.kind == "videomae":
        return _videomae_extractor(path, device)
    raise ValueError(f"evaluate.feature_extractor.kind {cfg.kind!r} is not supported; choose proxy, clip or videomae")
