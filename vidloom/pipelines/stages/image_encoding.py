from __future__ import annotations

import torch

from ...io.images import to_model_input
from ...memory.residency import handle_of
from ..base import PipelineStage, VerificationResult, is_tensor
from ..batch import Conditioning, ForwardBatch


def _decoded_images(stage: str, batch: ForwardBatch, given: int) -> VerificationResult:
    """The batch must carry the request's ``given`` images, decoded (``VideoGenerator.check`` does it)."""
    return VerificationResult(stage, "input").check("images", len(batch.images) == given,
                                                    f"must hold the request's {given} decoded image(s)")


class ImageEncodingStage(PipelineStage):
    """Image-to-video (Wan2.1 I2V / first-last-frame): the request's image(s) -> the conditioning.

    - image tokens: the image encoder's penultimate hidden states of the image (and the last
      image), for the transformer's image cross-attention (none without an image encoder);
    - condition: the video [image, zeros..., (last image)] at the request's size, VAE-encoded
      (posterior mean) and normalised, after a 4-per-latent-frame mask that marks the given frames:
      (1, tf + z_dim, latent frames, h, w), concatenated to the latents at every step.
    As diffusers' WanImageToVideoPipeline.
    """

    name = "image_encoding"

    def __init__(self, vae, image_encoder, device: torch.device, dtype: torch.dtype):
        self.vae = handle_of(vae, "vae")  # a handle (``memory.residency``), or the module
        self.image_encoder = image_encoder  # models.encoders.WanImageEncoder, or None
        self.device = device
        self.dtype = dtype  # the transformer's

    def verify_input(self, batch: ForwardBatch) -> VerificationResult:
        return _decoded_images(self.name, batch, 1 + (batch.params.last_image is not None))

    def forward(self, batch: ForwardBatch) -> ForwardBatch:
        p = batch.params
        images = list(batch.images)  # decoded once, when the request was checked
        embeds = None
        if self.image_encoder is not None:
            embeds = self.image_encoder.encode(images).to(self.device, self.dtype)
        batch.conditioning = Conditioning(image_embeds=embeds, condition=self.condition(images, p))
        return batch

    @torch.no_grad()
    def condition(self, images: list, p) -> torch.Tensor:
        first = to_model_input(images[0], p.height, p.width)[:, :, None]  # (1, 3, 1, H, W) in [-1, 1]
        middle = p.num_frames - len(images)
        parts = [first, first.new_zeros(1, 3, middle, p.height, p.width)]
        if len(images) > 1:
            parts.append(to_model_input(images[1], p.height, p.width)[:, :, None])
        video = torch.cat(parts, dim=2)  # (1, 3, F, H, W)
        with self.vae.use() as vae:
            latents = vae.normalize_latents(vae.encode_mean(video).float())  # (1, z, f, h, w)
        tf = self.vae.config.temporal_factor
        f, h, w = latents.shape[2:]
        given = torch.zeros(p.num_frames)
        given[0] = 1
        if len(images) > 1:
            given[-1] = 1
        # the first frame stands for tf frames (the first latent frame covers one), so tf x f values:
        # (tf * f,) -> (f, tf) -> one mask channel per frame of a latent frame
        frames = torch.cat([given[:1].repeat(tf), given[1:]])
        mask = frames.view(f, tf).t()[None, :, :, None, None].expand(1, tf, f, h, w)
        return torch.cat([mask.to(latents), latents], dim=1).to(self.device)

    def verify_output(self, batch: ForwardBatch) -> VerificationResult:
        r = VerificationResult(self.name, "output")
        c = batch.conditioning
        r.check("conditioning.condition", c is not None and is_tensor(c.condition, 5), "must be (1, C, f, h, w)")
        if self.image_encoder is not None:
            r.check("conditioning.image_embeds", c is not None and is_tensor(c.image_embeds, 3),
                    "must be (images, tokens, width)")
        return r


class FirstFrameStage(PipelineStage):
    """Wan2.2 TI2V: the request's image, if any -> the conditioning. The image alone, at the
    request's size, VAE-encoded (posterior mean) and normalised becomes the first latent frame
    (``condition`` (1, z_dim, 1, h, w)); ``frame_mask`` marks that frame as given. Without an image
    the request is text-to-video and there is no conditioning. As diffusers'
    WanImageToVideoPipeline with ``expand_timesteps``."""

    name = "image_encoding"

    def __init__(self, vae, device: torch.device):
        self.vae = handle_of(vae, "vae")  # a handle (``memory.residency``), or the module
        self.device = device

    def verify_input(self, batch: ForwardBatch) -> VerificationResult:
        return _decoded_images(self.name, batch, int(batch.params.image is not None))

    @torch.no_grad()
    def forward(self, batch: ForwardBatch) -> ForwardBatch:
        p = batch.params
        if p.image is None:
            batch.conditioning = None
            return batch
        # (1, 3, 1, H, W): the image decoded once, when the request was checked
        frame = to_model_input(batch.images[0], p.height, p.width)[:, :, None]
        with self.vae.use() as vae:
            condition = vae.normalize_latents(vae.encode_mean(frame).float()).to(self.device)
        f, h, w = self.vae.config.latent_size(p.num_frames, p.height, p.width)
        mask = torch.ones(1, 1, f, h, w, device=self.device)
        mask[:, :, 0] = 0
        batch.conditioning = Conditioning(condition=condition, frame_mask=mask)
        return batch

    def verify_output(self, batch: ForwardBatch) -> VerificationResult:
        r = VerificationResult(self.name, "output")
        c = batch.conditioning
        if batch.params.image is not None:
            r.check("conditioning.condition", c is not None and is_tensor(c.condition, 5), "must be (1, z, 1, h, w)")
            r.check("conditioning.frame_mask", c is not None and is_tensor(c.frame_mask, 5), "must be (1, 1, f, h, w)")
        return r
