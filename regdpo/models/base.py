"""`VideoModelSpec`: the one narrow interface through which every stage touches a model.

A spec is cheap to build: it loads nothing until a role is asked for, so each stage holds only
what it uses (the split finetrainers makes between condition, latent and diffusion models):

- **condition models** (text encoder + tokenizer; image-to-video adds the image encoder and
  processor): `encode_condition`. Loaded once, on first use.
- **latent model** (the VAE): `encode_video`, `decode`. Loaded once, on first use.
- **denoiser**: `load_denoiser()` builds a fresh module each call. The caller owns it and passes
  it in to `predict(denoiser, ...)` and `generate(denoiser, ...)`; the spec never holds or swaps
  one, so base and tuned models can live side by side. Training and evaluation's error pass
  build the denoiser alone: the pairs were pre-encoded so that neither the VAE nor the text
  encoder is resident then.

The family also owns its noise schedule and timestep scaling (`sample_timesteps`,
`noisy_and_target`, `predict` takes the schedule's t) and its shape rules (`check_video_shape`,
`latent_shape`), so stages never test family names (`needs_first_frame` says whether the
condition includes the clip's first frame).

Conventions shared by all families:
- Videos on the pixel side are uint8 numpy arrays (B, F, H, W, 3).
- Latents are float32 (B, C, F', H', W'), already normalised the way the family's denoiser
  expects its input, so training code never needs the VAE's statistics.
- Conditioning is a flat dict of batch-first tensors with string keys: it is written to
  safetensors shards by the encode stage and handed back to `predict` unchanged.
- `predict` returns float32 so errors are always computed in float32.

LoRA is implemented here once for any denoiser that follows the diffusers `PeftAdapterMixin`
API (add_adapter / enable_adapters / load_lora_adapter); a family only names the diffusers
pipeline class whose `save_lora_weights` writes its LoRA file format.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

ADAPTER_NAME = "default"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name


class VideoModelSpec(ABC):
    """A video diffusion model family as the toolkit sees it: roles loaded on demand, the noise
    schedule, shape rules, predict and sample with a denoiser passed in."""

    family: str
    prediction_type: ClassVar[str]  # "flow" (Wan); "epsilon" / "v" for DDPM-style families
    needs_first_frame: ClassVar[bool] = False  # the condition includes the clip's first frame (I2V)
    device: torch.device
    dtype: torch.dtype

    # A diffusers pipeline class whose `save_lora_weights` writes this family's LoRA files.
    lora_pipeline_cls: ClassVar[type]
    # The key prefix of the denoiser's weights in that file ("transformer." in diffusers).
    lora_prefix: ClassVar[str] = "transformer"

    # ---- identity and shape rules ---------------------------------------------------------

    @abstractmethod
    def fingerprint(self) -> str:
        """A short stable hash of the base weights (cheap: no weights are loaded)."""

    @abstractmethod
    def check_video_shape(self, num_frames: int, height: int, width: int) -> None:
        """Raise ValueError naming `video.<field>` and the fix when the clip spec does not fit the model."""

    @abstractmethod
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F', H', W') of one clip's latents."""

    # ---- noise schedule -------------------------------------------------------------------

    @abstractmethod
    def sample_timesteps(self, num: int, timesteps_cfg, generator: torch.Generator | None = None) -> torch.Tensor:
        """`num` training timesteps in the schedule's own units (float32, CPU), per `train.timesteps`."""

    @abstractmethod
    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, the training target) for clean latents x0, noise ε and timesteps t of shape (B,)."""

    # ---- roles ----------------------------------------------------------------------------

    @abstractmethod
    def load_denoiser(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
                      ) -> torch.nn.Module:
        """A fresh denoiser with the base weights (default: the spec's device and dtype), in eval mode."""

    @abstractmethod
    def encode_video(self, videos: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, F, H, W, 3) -> normalised float32 latents (B, C, F', H', W'). Loads the latent model."""

    @abstractmethod
    def decode(self, latents_BCFHW: torch.Tensor) -> np.ndarray:
        """Normalised latents -> uint8 video (B, F, H, W, 3). Loads the latent model."""

    @abstractmethod
    def encode_condition(
        self, prompts: list[str], first_frames: np.ndarray | None = None, *, num_frames: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Everything the denoiser needs besides the noisy latents, as batch-first tensors.
        Loads the condition models (and, for image-to-video, the latent model)."""

    @abstractmethod
    def predict(self, denoiser: torch.nn.Module, noisy_latents_BCFHW: torch.Tensor, t_B: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's output (the flow velocity for "flow"), float32, differentiable."""

    @abstractmethod
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
    ) -> np.ndarray:
        """Sample one uint8 video (F, H, W, 3) per prompt with `denoiser`; video i depends only on seeds[i]."""

    # ---- structure of a denoiser (what distributed code shards and checkpoints) ---------------

    def transformers(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The diffusers transformer modules that make up `denoiser`: itself, or one per expert
        for a family whose denoiser is a set of experts routed by timestep."""
        return [denoiser]

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The transformer blocks FSDP shards one by one and activation checkpointing wraps,
        over every transformer of `denoiser` (diffusers names them `blocks` or `transformer_blocks`)."""
        out: list[torch.nn.Module] = []
        for transformer in self.transformers(denoiser):
            found = getattr(transformer, "blocks", None)
            if found is None:
                found = getattr(transformer, "transformer_blocks", None)
            if found is None:
                raise ValueError(f"{type(transformer).__name__} has no `blocks` or `transformer_blocks`: its spec must "
                                 "override blocks()")
            out.extend(found)
        return out

    def bind(self, denoiser: torch.nn.Module) -> "BoundDenoiser":
        """`denoiser` with this spec's predict/generate, for code that compares models (base vs tuned)."""
        return BoundDenoiser(self, denoiser)

    # ---- LoRA on a denoiser (diffusers PeftAdapterMixin) -----------------------------------

    @staticmethod
    def has_lora(denoiser: torch.nn.Module) -> bool:
        return ADAPTER_NAME in (getattr(denoiser, "peft_config", None) or {})

    def add_lora(self, denoiser: torch.nn.Module, lora_cfg) -> None:
        """Attach a fresh LoRA adapter named "default" (peft inits B = 0, so it starts as a no-op)."""
        from peft import LoraConfig as PeftLoraConfig

        if self.has_lora(denoiser):
            raise RuntimeError("a LoRA adapter is already attached; add_lora must be called once per denoiser")
        peft_cfg = PeftLoraConfig(
            r=lora_cfg.rank,
            lora_alpha=lora_cfg.alpha,
            lora_dropout=lora_cfg.dropout,
            target_modules=list(lora_cfg.target_modules),
            init_lora_weights=True,
        )
        denoiser.add_adapter(peft_cfg, adapter_name=ADAPTER_NAME)

    def set_adapters_enabled(self, denoiser: torch.nn.Module, enabled: bool) -> None:
        """Switch LoRA on/off. Off = the base weights exactly, which is the DPO reference.

        Explicit calls rather than a context manager so the trainer can keep the toggle next
        to the forward pass it guards (see regdpo/train/reference.py). Note peft sets
        requires_grad=False on the adapter while disabled and True again when enabled.
        """
        if not self.has_lora(denoiser):
            raise RuntimeError("set_adapters_enabled needs a LoRA adapter: call add_lora or load_lora first")
        if enabled:
            denoiser.enable_adapters()
        else:
            denoiser.disable_adapters()

    def trainable_parameters(self, denoiser: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The LoRA weights if an adapter is attached (whatever its on/off state), else every
        parameter that requires grad (full fine-tuning)."""
        if self.has_lora(denoiser):
            return [p for n, p in denoiser.named_parameters() if "lora_" in n]
        return [p for p in denoiser.parameters() if p.requires_grad]

    @staticmethod
    def lora_state_dict(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed as peft/diffusers save them (no adapter name); they share
        storage with the live parameters."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser, adapter_name=ADAPTER_NAME)

    def save_lora(self, denoiser: torch.nn.Module, directory: str | Path,
                  tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Write `pytorch_lora_weights.safetensors` in diffusers format (keys "transformer.…",
        the peft LoraConfig in the metadata so rank and alpha load back exactly). `tensors`
        (keyed as `lora_state_dict`) replaces the live weights, e.g. gathered or EMA weights."""
        if not self.has_lora(denoiser):
            raise RuntimeError("save_lora: no LoRA adapter attached")
        source = self.lora_state_dict(denoiser) if tensors is None else tensors
        layers = {k: v.detach().to("cpu").contiguous() for k, v in source.items()}
        metadata = denoiser.peft_config[ADAPTER_NAME].to_dict()
        self.lora_pipeline_cls.save_lora_weights(
            str(directory), transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata,
            weight_name=LORA_WEIGHT_NAME,
        )
        return Path(directory) / LORA_WEIGHT_NAME

    def load_lora(self, denoiser: torch.nn.Module, directory: str | Path) -> None:
        """Load a LoRA written by `save_lora` (or any diffusers LoRA for this family) into `denoiser`.

        With an adapter already attached (add_lora with the training's LoraConfig), the weights
        are copied into it in place, so existing Parameter objects (an optimizer's) stay valid
        and a rank mismatch is an error. Without one, diffusers builds the adapter from the
        file's own metadata.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(directory) / LORA_WEIGHT_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected a LoRA saved by save_lora")
        if not self.has_lora(denoiser):
            denoiser.load_lora_adapter(
                str(directory), prefix=self.lora_prefix, adapter_name=ADAPTER_NAME, weight_name=LORA_WEIGHT_NAME,
                local_files_only=True,
            )
            return
        prefix = self.lora_prefix + "."
        saved = {k[len(prefix):]: v for k, v in load_file(path).items() if k.startswith(prefix)}
        live = self.lora_state_dict(denoiser)
        if set(saved) != set(live) or any(saved[k].shape != live[k].shape for k in live):
            raise ValueError(
                f"{path}: LoRA tensors do not match the attached adapter (different rank or target_modules); "
                "use the train.lora settings the LoRA was trained with"
            )
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        saved_alpha = meta.get(f"{prefix}lora_alpha")
        live_alpha = denoiser.peft_config[ADAPTER_NAME].lora_alpha
        if saved_alpha is not None and float(saved_alpha) != float(live_alpha):
            raise ValueError(f"{path}: LoRA was saved with alpha={saved_alpha}, the attached adapter has {live_alpha}")
        with torch.no_grad():
            for k, tensor in live.items():
                tensor.copy_(saved[k].to(tensor.device, tensor.dtype))



@dataclass(frozen=True)
class BoundDenoiser:
    """A spec with one denoiser bound (immutable: a new binding, never a swapped module)."""

    spec: VideoModelSpec
    denoiser: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return self.spec.device

    @property
    def prediction_type(self) -> str:
        return self.spec.prediction_type

    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        return self.spec.noisy_and_target(x0, noise, t)

    def predict(self, noisy_latents_BCFHW: torch.Tensor, t_B: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.spec.predict(self.denoiser, noisy_latents_BCFHW, t_B, cond)

    def generate(self, prompts: list[str], seeds: list[int], **kwargs) -> np.ndarray:
        return self.spec.generate(self.denoiser, prompts, seeds, **kwargs)
