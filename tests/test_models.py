"""Model specs on the tiny Wan preset (CPU, 9 frames 32x32): shapes, determinism, agreement
with the diffusers pipelines, LoRA toggling and save/load, local-directory loading.

Run: .venv/bin/pytest tests/test_models.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regdpo.config import LoraConfig, ModelConfig
from regdpo.models import load_model

NUM_FRAMES, HEIGHT, WIDTH = 9, 32, 32
LATENT_SHAPE = (1, 16, 3, 4, 4)
FAMILIES = ["wan-t2v", "wan-i2v"]


def tiny_cfg(family: str = "wan-t2v", **kw) -> ModelConfig:
    return ModelConfig(family=family, preset="tiny", device="cpu", max_sequence_length=16, **kw)


def clip(seed: int = 0) -> np.ndarray:
    """A (1, F, H, W, 3) uint8 clip: a moving gradient plus noise, so frames differ."""
    rng = np.random.default_rng(seed)
    f, y, x = np.meshgrid(np.arange(NUM_FRAMES), np.arange(HEIGHT), np.arange(WIDTH), indexing="ij")
    base = np.stack([(x + 3 * f) * 6, y * 7, (x + y) * 3], axis=-1) % 256
    noise = rng.integers(0, 32, base.shape)
    return ((base + noise) % 256).astype(np.uint8)[None]


@pytest.fixture(scope="module", params=FAMILIES)
def spec(request):
    return load_model(tiny_cfg(request.param))


@pytest.fixture(scope="module")
def denoiser(spec):
    return spec.load_denoiser()


def condition(spec, video: np.ndarray, prompt: str = "a red ball rolls") -> dict[str, torch.Tensor]:
    return spec.encode_condition([prompt], first_frames=video[:, 0], num_frames=NUM_FRAMES)


def sample(spec, denoiser, prompts, seeds, video, **kw):
    first = np.repeat(video[:, 0], len(prompts), axis=0) if spec.needs_first_frame else None
    args = dict(num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=2, guidance_scale=3.0)
    return spec.generate(denoiser, prompts, seeds, first_frames=first, **{**args, **kw})


def test_encode_predict_decode_shapes(spec, denoiser):
    video = clip()
    latents = spec.encode_video(video)
    assert latents.shape == LATENT_SHAPE and latents.dtype == torch.float32
    assert torch.equal(latents, spec.encode_video(torch.from_numpy(video)))  # numpy or tensor, deterministic
    cond = condition(spec, video)
    assert cond["prompt_embeds"].shape == (1, 16, 384)
    if spec.family == "wan-i2v":
        assert cond["condition_latents"].shape == (1, 20, 3, 4, 4)
        assert cond["image_embeds"].shape[0] == 1
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in cond.items())
    assert latents.shape[1:] == spec.latent_shape(NUM_FRAMES, HEIGHT, WIDTH)
    pred = spec.predict(denoiser, latents, torch.tensor([0.5]), cond)
    assert pred.shape == LATENT_SHAPE and pred.dtype == torch.float32 and torch.isfinite(pred).all()
    frames = spec.decode(latents)
    assert frames.shape == (1, NUM_FRAMES, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8


def test_predict_is_differentiable(spec, denoiser):
    latents = spec.encode_video(clip()).requires_grad_(True)
    spec.predict(denoiser, latents, torch.tensor([0.3]), condition(spec, clip())).square().mean().backward()
    assert latents.grad is not None and torch.isfinite(latents.grad).all()
    denoiser.zero_grad(set_to_none=True)


def test_generate_depends_only_on_seed(spec, denoiser):
    video = clip()
    a = sample(spec, denoiser, ["a cat", "a dog"], [1, 2], video)
    assert a.shape == (2, NUM_FRAMES, HEIGHT, WIDTH, 3) and a.dtype == np.uint8
    b = sample(spec, denoiser, ["a dog"], [2], video)
    c = sample(spec, denoiser, ["a dog"], [3], video)
    assert np.array_equal(b, sample(spec, denoiser, ["a dog"], [2], video))  # same call: same bytes
    # Same seed alone or in a batch: equal up to the float rounding of batched kernels, which
    # may move a pixel by one uint8 level; another seed moves it far more.
    alone_vs_batched = np.abs(a[1].astype(int) - b[0].astype(int))
    assert alone_vs_batched.max() <= 1 and alone_vs_batched.mean() < 0.05
    assert np.abs(b.astype(int) - c.astype(int)).mean() > 0.5


def test_predict_agrees_with_pipeline(spec, denoiser):
    """One Euler step from pure noise (sigma = 1 -> 0) gives x0 = ε - v: decoding that with
    `predict` must reproduce what the diffusers pipeline generates, which pins the timestep
    scale, the conditioning and the I2V channel concatenation to the pipeline's."""
    video, seed = clip(), 7
    cond = condition(spec, video, "a dog")
    noise = torch.randn(LATENT_SHAPE, generator=torch.Generator("cpu").manual_seed(seed))
    x0 = noise - spec.predict(denoiser, noise, torch.tensor([1.0]), cond)
    ours = spec.decode(x0).astype(int)
    theirs = sample(spec, denoiser, ["a dog"], [seed], video, num_inference_steps=1, guidance_scale=1.0).astype(int)
    assert np.abs(ours - theirs).max() <= 1  # uint8 rounding of float-level differences


def test_tiny_preset_is_seeded():
    a, b, c = (load_model(tiny_cfg(seed=s)) for s in (0, 0, 1))
    sa, sb, sc = (m.load_denoiser().state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    va, vb = a.latent_model().state_dict(), b.latent_model().state_dict()
    assert all(torch.equal(va[k], vb[k]) for k in va)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


# The tiny preset's weights predate the spec by role (when one seeded build made every
# component); building the denoiser alone must give the same weights, or every fingerprinted
# output and golden number made with the preset silently changes meaning.
TINY_DENOISER_SUMS = {"wan-t2v": 2748.815265333258, "wan-i2v": 2860.3066279863842}
TINY_FINGERPRINTS = {"wan-t2v": "6ad3b0e027225b0a", "wan-i2v": "82312dffa386a353"}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_denoiser_weights_are_unchanged(family):
    spec = load_model(tiny_cfg(family))
    state = spec.load_denoiser().state_dict()
    total = sum(float(v.double().abs().sum()) for v in state.values())
    assert total == pytest.approx(TINY_DENOISER_SUMS[family], rel=1e-12)
    assert spec.fingerprint() == TINY_FINGERPRINTS[family]


def test_roles_load_on_demand(monkeypatch):
    """Building the spec loads nothing; the denoiser alone loads no VAE or text encoder."""
    import diffusers
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a role was loaded that was not asked for")

    monkeypatch.setattr(diffusers.AutoencoderKLWan, "__init__", refuse)
    monkeypatch.setattr(transformers.BertModel, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.CLIPVisionModelWithProjection, "__init__", refuse)
    for family in FAMILIES:
        spec = load_model(tiny_cfg(family))
        spec.load_denoiser()
        spec.fingerprint()
        spec.check_video_shape(NUM_FRAMES, HEIGHT, WIDTH)
        with pytest.raises(AssertionError, match="not asked for"):
            spec.latent_model()


def test_shape_rules_name_the_field():
    spec = load_model(tiny_cfg())
    assert spec.latent_shape(81, 480, 832) == (16, 21, 60, 104)
    with pytest.raises(ValueError, match="video.num_frames must be 4k\\+1"):
        spec.check_video_shape(10, 32, 32)
    with pytest.raises(ValueError, match="video.width must be a multiple of 16"):
        spec.check_video_shape(9, 32, 40)


def _lora_spec(lora: LoraConfig):
    spec = load_model(tiny_cfg())
    denoiser = spec.load_denoiser()
    spec.add_lora(denoiser, lora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peft inits B = 0 (a no-op adapter): perturb it so the test has teeth
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return spec, denoiser


def test_lora_toggle_save_and_load(tmp_path):
    lora = LoraConfig(rank=4, alpha=8.0)  # alpha != rank: the saved metadata must carry the scale
    base = load_model(tiny_cfg())
    video = clip()
    latents, cond, t = base.encode_video(video), condition(base, video), torch.tensor([0.4])
    with torch.no_grad():
        base_pred = base.predict(base.load_denoiser(), latents, t, cond)

    spec, denoiser = _lora_spec(lora)
    trainable = {id(p) for p in spec.trainable_parameters(denoiser)}
    names = [n for n, p in denoiser.named_parameters() if id(p) in trainable]
    assert names and all("lora_" in n for n in names)
    with torch.no_grad():
        tuned = spec.predict(denoiser, latents, t, cond)
        spec.set_adapters_enabled(denoiser, False)
        off = spec.predict(denoiser, latents, t, cond)
        spec.set_adapters_enabled(denoiser, True)
        assert torch.equal(spec.predict(denoiser, latents, t, cond), tuned)
    assert torch.equal(off, base_pred)  # disabled adapters = the base weights exactly
    assert not torch.allclose(tuned, base_pred)

    path = spec.save_lora(denoiser, tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"

    fresh = base.load_denoiser()  # no adapter: diffusers builds it from the file (load_lora_adapter)
    base.load_lora(fresh, tmp_path / "lora")
    attached = base.load_denoiser()  # adapter attached first (evaluate's path): copied in place
    base.add_lora(attached, lora)
    base.load_lora(attached, tmp_path / "lora")
    via_pipe = base.load_denoiser()  # the standard diffusers entry point
    base.pipeline(via_pipe).load_lora_weights(str(tmp_path / "lora"), adapter_name="default")
    with torch.no_grad():
        for other in (fresh, attached, via_pipe):
            torch.testing.assert_close(base.predict(other, latents, t, cond), tuned, rtol=1e-5, atol=1e-6)

    wrong = base.load_denoiser()
    base.add_lora(wrong, LoraConfig(rank=2, alpha=8.0))
    with pytest.raises(ValueError, match="rank"):
        base.load_lora(wrong, tmp_path / "lora")


def test_lora_gradients_reach_adapter_only():
    spec = load_model(tiny_cfg())
    denoiser = spec.load_denoiser().requires_grad_(False)
    spec.add_lora(denoiser, LoraConfig(rank=2))
    video = clip()
    spec.predict(denoiser, spec.encode_video(video), torch.tensor([0.5]), condition(spec, video)).square().mean().backward()
    params = spec.trainable_parameters(denoiser)
    assert params and all(p.grad is not None for p in params)
    assert all(p.grad is None for p in denoiser.parameters() if all(p is not q for q in params))


@pytest.mark.parametrize("family", FAMILIES)
def test_load_from_local_directory(tmp_path, family):
    """A diffusers model directory (here: the tiny preset saved with save_pretrained) loads
    without network and predicts exactly like the preset it came from."""
    tiny = load_model(tiny_cfg(family))
    tiny.pipeline(tiny.load_denoiser()).save_pretrained(tmp_path / "model")
    spec = load_model(ModelConfig(family=family, path=str(tmp_path / "model"), device="cpu", max_sequence_length=16))
    video = clip()
    latents = tiny.encode_video(video)
    assert torch.equal(spec.encode_video(video), latents)
    with torch.no_grad():
        want = tiny.predict(tiny.load_denoiser(), latents, torch.tensor([0.6]), condition(tiny, video))
        got = spec.predict(spec.load_denoiser(), latents, torch.tensor([0.6]), condition(spec, video))
    assert torch.equal(got, want)
    assert len(spec.fingerprint()) == 16 and spec.fingerprint() != tiny.fingerprint()


def test_missing_model_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(ModelConfig(path=str(missing), device="cpu"))
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing transformer, text_encoder, tokenizer, vae"):
        load_model(ModelConfig(path=str(tmp_path / "partial"), device="cpu"))
