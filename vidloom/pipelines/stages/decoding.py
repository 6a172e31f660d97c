from __future__ import annotations

import torch

from ...memory.levels import STREAMING_DECODE, level_now
from ...memory.residency import handle_of
from ..base import Phase, PipelineStage, VerificationResult, is_tensor
from ..batch import ForwardBatch


class DecodingStage(PipelineStage):
    """Latents -> video in [0, 1] through the VAE (whole or spatially tiled).

    ``output_type="latent"`` skips it. The VAE runs in its own dtype (fp32 by default).
    ``map_tiles`` (``parallel.vae.TileSpreader`` in a multi-process run) spreads the tiles of the
    tiled decode over the processes; the decode is then always tiled. From memory level 1
    (``memory.levels``; ``level``: the engine's) the whole decode runs one frame per step.
    """

    name = "decoding"
    phase = Phase.DECODING

    def __init__(self, vae, tiling: bool = False, tile_size: int = 256, tile_overlap: int = 64, map_tiles=None,
                 level: int = 0):
        """``vae``: the VAE's handle (``memory.residency``), or the module itself."""
        self.vae = handle_of(vae, "vae")
        self.level = level
        self.tiling = tiling or map_tiles is not None
        self.map_tiles = map_tiles
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the VAE computes in, as the loader declared it."""
        return self.vae.dtype

    def verify_input(self, batch: ForwardBatch) -> VerificationResult:
        return VerificationResult(self.name, "input").check("latents", is_tensor(batch.latents, 5), "must be 5-D")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, F, H, W) -> video (B, 3, T, H, W) float32 in [0, 1]."""
        with self.vae.use() as vae:
            z = vae.denormalize_latents(latents.to(self.dtype))
            if self.tiling:
                factor = vae.config.spatial_factor  # tile sizes are given in pixels, the VAE takes latents
                tile, overlap = self.tile_size // factor, self.tile_overlap // factor
                video = vae.decode_tiled(z, tile_latent=(tile, tile), overlap_latent=(overlap, overlap),
                                         map_tiles=self.map_tiles)
            elif level_now(self.level) >= STREAMING_DECODE:
                stream = vae.stream_decoder()
                stream.step_elements = 1  # one frame per step at every stage: the smallest working set
                video = stream.push(z)
            else:
                video = vae.decode(z)
        return (video.float() * 0.5 + 0.5).clamp(0, 1)

    def forward(self, batch: ForwardBatch) -> ForwardBatch:
        if batch.params.output_type == "latent":
            return batch
        batch.video = self.decode(batch.latents)
        if batch.params.decode_trajectory:
            batch.trajectory_video = [self.decode(z) for z in batch.trajectory]
        return batch

    def verify_output(self, batch: ForwardBatch) -> VerificationResult:
        r = VerificationResult(self.name, "output")
        if batch.params.output_type != "latent":
            p = batch.params
            ok = is_tensor(batch.video, 5) and tuple(batch.video.shape[1:]) == (3, p.num_frames, p.height, p.width)
            r.check("video", ok, f"must be (B, 3, {p.num_frames}, {p.height}, {p.width})")
        return r
