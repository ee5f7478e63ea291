"""Feature extractors for the Fréchet distance (regdpo/eval/features.py): the offline proxy and
local CLIP / VideoMAE directories (tiny random-init models saved to a temp dir)."""

import numpy as np
import pytest

from regdpo.config import ConfigError, FeatureExtractorConfig, config_from_dict
from regdpo.eval.features import load_feature_extractor


def _video(seed=0, frames=5, size=32):
    return np.random.default_rng(seed).integers(0, 256, size=(frames, size, size, 3), dtype=np.uint8)


def test_proxy_is_deterministic_labelled_and_sees_texture():
    fx = load_feature_extractor(FeatureExtractorConfig())
    assert fx.is_proxy and "PROXY" in fx.label and "FVD" not in fx.label.replace("not FID/FVD", "")
    v = _video()
    a, b = fx(v), fx(v.copy())
    assert a.shape == (5, 54) and np.array_equal(a, b)
    grey = np.full_like(v, 128)
    assert np.abs(fx(grey)[:, 48:]).max() < 1e-12  # a flat picture has no contrast and no edges
    assert fx(v)[:, 48:].min() > 0


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=16, projection_dim=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, image_size=32, patch_size=8)
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_clip_directory_gives_per_frame_embeddings(clip_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt would fail loudly
    fx = load_feature_extractor(FeatureExtractorConfig(kind="clip", path=str(clip_dir), batch_size=2))
    assert not fx.is_proxy and fx.per == "frame" and "FID-style" in fx.label
    v = _video(frames=5, size=48)
    feats = fx(v)
    assert feats.shape == (5, 8) and np.all(np.isfinite(feats))
    again = load_feature_extractor(FeatureExtractorConfig(kind="clip", path=str(clip_dir), batch_size=5))
    np.testing.assert_allclose(again(v), feats, rtol=1e-5, atol=1e-6)  # batching does not change features
    assert not np.allclose(fx(_video(seed=1, size=48)), feats)


def test_videomae_directory_gives_one_embedding_per_clip(tmp_path):
    import torch
    from transformers import VideoMAEConfig, VideoMAEImageProcessor, VideoMAEModel

    torch.manual_seed(0)
    cfg = VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=16,
                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    VideoMAEModel(cfg).save_pretrained(tmp_path)
    VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    fx = load_feature_extractor(FeatureExtractorConfig(kind="videomae", path=str(tmp_path)))
    assert fx.per == "clip" and "FVD-style" in fx.label
    feats = fx(_video(frames=9))
    assert feats.shape == (1, 16) and np.all(np.isfinite(feats))


def test_a_directory_without_its_image_processor_is_refused(tmp_path, clip_dir):
    import shutil

    shutil.copytree(clip_dir, tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        load_feature_extractor(FeatureExtractorConfig(kind="clip", path=str(tmp_path / "clip")))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_feature_extractor(FeatureExtractorConfig(kind="clip", path=str(tmp_path / "nope")))


@pytest.mark.parametrize("fx,match", [
    ({"kind": "clip"}, "needs path"),
    ({"kind": "clip", "path": "relative/dir"}, "absolute"),
    ({"kind": "proxy", "path": "/x"}, "kind is proxy"),
    ({"kind": "i3d", "path": "/x"}, "kind"),
])
def test_feature_extractor_config_errors_name_the_field(fx, match):
    raw = {"workdir": "/tmp/w", "model": {"preset": "tiny"}, "ingest": {"manifest": "m.csv"},
           "evaluate": {"feature_extractor": fx}}
    with pytest.raises(ConfigError, match=match) as err:
        config_from_dict(raw)
    assert "evaluate.feature_extractor" in str(err.value)
