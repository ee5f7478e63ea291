"""Wan 2.1 image-to-video: the Wan spec plus the first frame as conditioning (CLIP image
embeddings and masked first-frame VAE latents), each computed by WanImageToVideoPipeline's own
methods so the tuned model sees exactly what the pipeline gives it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from regdpo.models.wan import (
    TINY_CLIP,
    TINY_CLIP_PROCESSOR,
    TINY_I2V_TRANSFORMER,
    WanImageToVideoPipeline,
    WanSpec,
    _as_uint8_array,
    _seeded,
)


class WanI2VSpec(WanSpec):
    """Wan 2.1 image-to-video: adds the first frame as CLIP embeddings and as masked VAE latents
    concatenated to the noisy latents on channels (16 + 4 + 16 = 36 input channels)."""

    pipeline_cls = WanImageToVideoPipeline
    needs_first_frame = True
    condition_roles = WanSpec.condition_roles + ("image_encoder", "image_processor")

    @classmethod
    def _tiny_transformer_cfg(cls) -> dict[str, Any]:
        return TINY_I2V_TRANSFORMER

    def _build_tiny_role(self, name: str) -> Any:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        if name == "image_encoder":
            return _seeded(self.model_cfg.seed, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)))
        if name == "image_processor":
            return CLIPImageProcessor(**TINY_CLIP_PROCESSOR)
        return super()._build_tiny_role(name)

    @torch.no_grad()
    def _image_embeds(self, images: list[Image.Image]) -> torch.Tensor:
        """CLIP penultimate hidden states, by WanImageToVideoPipeline.encode_image itself."""
        pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                                       image_processor=self._role("image_processor"),
                                       image_encoder=self._role("image_encoder"))
        return pipe.encode_image(images, self.device).float()

    @torch.no_grad()
    def _condition_latents(self, image: Image.Image, num_frames: int) -> torch.Tensor:
        """WanImageToVideoPipeline.prepare_latents' condition, by calling it. A zero `latents`
        placeholder stops it from drawing noise (which would consume the global RNG)."""
        vae = self.latent_model()
        pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=None)
        height, width = image.height, image.width
        pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(self.device, torch.float32)
        z_dim = vae.config.z_dim
        shape = (1, z_dim, *self.latent_shape(num_frames, height, width)[1:])
        _, condition = pipe.prepare_latents(
            pixels, 1, z_dim, height, width, num_frames, torch.float32, self.device,
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
        cond["image_embeds"] = self._image_embeds(images)
        cond["condition_latents"] = torch.cat([self._condition_latents(im, num_frames) for im in images])
        return cond

    def _model_input(self, noisy_latents_BCFHW: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        if "condition_latents" not in cond:
            raise KeyError("wan-i2v predict needs cond['condition_latents'] (from encode_condition)")
        condition = cond["condition_latents"].to(noisy_latents_BCFHW.device, noisy_latents_BCFHW.dtype)
        return torch.cat([noisy_latents_BCFHW, condition], dim=1)
