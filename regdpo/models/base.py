"""`VideoModelSpec`: the one narrow interface through which every stage touches a model.

Stages (generate, encode, train, evaluate) see only this class; model-family code (Wan, ...)
lives in its own module and is chosen by `regdpo.models.load_model`. Conventions shared by
all families:

- Videos on the pixel side are uint8 numpy arrays (B, F, H, W, 3).
- Latents are float32 (B, C, F', H', W'), already normalised the way the family's denoiser
  expects its input, so training code never needs the VAE's statistics.
- Conditioning is a flat dict of batch-first tensors with string keys: it is written to
  safetensors shards by the encode stage and handed back to `predict` unchanged.
- `predict` takes the flow-matching time t in [0, 1] (x_t = (1-t)·x0 + t·ε, see
  regdpo/flow_matching.py) and returns float32 so errors are always computed in float32.

LoRA is implemented here once for any denoiser that follows the diffusers `PeftAdapterMixin`
API (add_adapter / enable_adapters / load_lora_adapter); a family only names the diffusers
pipeline class whose `save_lora_weights` writes its LoRA file format.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

ADAPTER_NAME = "default"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name


class VideoModelSpec(ABC):
    """A video diffusion model as the toolkit sees it: VAE codec, conditioning, denoiser, sampler."""

    family: str
    prediction_type: str  # "flow" (Wan); "epsilon" / "v" are reserved for DDPM-style families
    transformer: torch.nn.Module  # the denoiser that is trained (and swapped by the reference)
    device: torch.device
    dtype: torch.dtype
    vae_scale_factor_temporal: int
    vae_scale_factor_spatial: int

    # A diffusers pipeline class whose `save_lora_weights` writes this family's LoRA files.
    lora_pipeline_cls: ClassVar[type]
    # The key prefix of the denoiser's weights in that file ("transformer." in diffusers).
    lora_prefix: ClassVar[str] = "transformer"

    # ---- model-specific -------------------------------------------------------------------

    @abstractmethod
    def fingerprint(self) -> str:
        """A short stable hash of the base weights: outputs record it so stale data is detected."""

    @abstractmethod
    def encode_video(self, videos: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, F, H, W, 3) -> normalised float32 latents (B, C, F', H', W')."""

    @abstractmethod
    def decode(self, latents_BCFHW: torch.Tensor) -> np.ndarray:
        """Normalised latents -> uint8 video (B, F, H, W, 3)."""

    @abstractmethod
    def encode_condition(
        self, prompts: list[str], first_frames: np.ndarray | None = None, *, num_frames: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Everything the denoiser needs besides the noisy latents, as batch-first tensors."""

    @abstractmethod
    def predict(self, noisy_latents_BCFHW: torch.Tensor, t_B: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's output (the flow velocity for "flow"), float32, differentiable."""

    @abstractmethod
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
        """Sample one uint8 video (F, H, W, 3) per prompt; video i depends only on seeds[i]."""

    # ---- LoRA (diffusers PeftAdapterMixin denoisers) --------------------------------------

    def has_lora(self) -> bool:
        return ADAPTER_NAME in (getattr(self.transformer, "peft_config", None) or {})

    def add_lora(self, lora_cfg) -> None:
        """Attach a fresh LoRA adapter named "default" (peft inits B = 0, so it starts as a no-op)."""
        from peft import LoraConfig as PeftLoraConfig

        if self.has_lora():
            raise RuntimeError("a LoRA adapter is already attached; add_lora must be called once per model")
        peft_cfg = PeftLoraConfig(
            r=lora_cfg.rank,
            lora_alpha=lora_cfg.alpha,
            lora_dropout=lora_cfg.dropout,
            target_modules=list(lora_cfg.target_modules),
            init_lora_weights=True,
        )
        self.transformer.add_adapter(peft_cfg, adapter_name=ADAPTER_NAME)

    def set_adapters_enabled(self, enabled: bool) -> None:
        """Switch LoRA on/off. Off = the base weights exactly, which is the DPO reference.

        Explicit calls rather than a context manager so the trainer can keep the toggle next
        to the forward pass it guards (see regdpo/train/reference.py). Note peft sets
        requires_grad=False on the adapter while disabled and True again when enabled.
        """
        if not self.has_lora():
            raise RuntimeError("set_adapters_enabled needs a LoRA adapter: call add_lora or load_lora first")
        if enabled:
            self.transformer.enable_adapters()
        else:
            self.transformer.disable_adapters()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA weights if an adapter is attached (whatever its on/off state), else every
        parameter that requires grad (full fine-tuning)."""
        if self.has_lora():
            return [p for n, p in self.transformer.named_parameters() if "lora_" in n]
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def _lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed as peft/diffusers save them (no adapter name); they share
        storage with the live parameters."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer, adapter_name=ADAPTER_NAME)

    def save_lora(self, directory: str | Path) -> Path:
        """Write `pytorch_lora_weights.safetensors` in diffusers format (keys "transformer.…",
        the peft LoraConfig in the metadata so rank and alpha load back exactly)."""
        if not self.has_lora():
            raise RuntimeError("save_lora: no LoRA adapter attached")
        layers = {k: v.detach().to("cpu").contiguous() for k, v in self._lora_state_dict().items()}
        metadata = self.transformer.peft_config[ADAPTER_NAME].to_dict()
        self.lora_pipeline_cls.save_lora_weights(
            str(directory), transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata,
            weight_name=LORA_WEIGHT_NAME,
        )
        return Path(directory) / LORA_WEIGHT_NAME

    def load_lora(self, directory: str | Path) -> None:
        """Load a LoRA written by `save_lora` (or any diffusers LoRA for this family).

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
        if not self.has_lora():
            self.transformer.load_lora_adapter(
                str(directory), prefix=self.lora_prefix, adapter_name=ADAPTER_NAME, weight_name=LORA_WEIGHT_NAME,
                local_files_only=True,
            )
            return
        prefix = self.lora_prefix + "."
        saved = {k[len(prefix):]: v for k, v in load_file(path).items() if k.startswith(prefix)}
        live = self._lora_state_dict()
        if set(saved) != set(live) or any(saved[k].shape != live[k].shape for k in live):
            raise ValueError(
                f"{path}: LoRA tensors do not match the attached adapter (different rank or target_modules); "
                "use the train.lora settings the LoRA was trained with"
            )
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        saved_alpha = meta.get(f"{prefix}lora_alpha")
        live_alpha = self.transformer.peft_config[ADAPTER_NAME].lora_alpha
        if saved_alpha is not None and float(saved_alpha) != float(live_alpha):
            raise ValueError(f"{path}: LoRA was saved with alpha={saved_alpha}, the attached adapter has {live_alpha}")
        with torch.no_grad():
            for k, tensor in live.items():
                tensor.copy_(saved[k].to(tensor.device, tensor.dtype))
