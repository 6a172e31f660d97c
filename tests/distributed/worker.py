"""One rank of a multi-process generation, started by torchrun from the tests:

    python -m torch.distributed.run --nproc-per-node N worker.py MODEL_DIR REQUEST_JSON OUT_NPY
"""

from __future__ import annotations

import json
import os
import sys

import torch


def main() -> None:
    torch.set_num_threads(1)
    model_dir, request_path, out = sys.argv[1:4]
    request = json.loads(open(request_path).read())
    rank = int(os.environ["RANK"])
    fail_rank, fail_step = request.pop("fail_on_rank", None), request.pop("fail_at_step", None)
    if fail_rank == rank and fail_step is None:
        raise RuntimeError(f"planted failure on rank {rank} before loading")

    def callback(step, total, timestep, latents):
        if fail_rank == rank and step == fail_step:
            raise RuntimeError(f"planted failure on rank {rank} at step {step}")
    from vidloom import VideoGenerator

    engine = request.pop("engine")
    if request.pop("mode", "generate") == "vae-decode":
        decode_tiles(model_dir, engine, request, out)
        return
    latents = torch.load(request.pop("latents_path"))
    gen = VideoGenerator.from_pretrained(model_dir, dtype="fp32", **engine)
    stage = gen.pipeline.denoising
    dit = gen.pipeline.components["transformer"]
    dit_bytes = sum(p.numel() * p.element_size() for p in dit.parameters())
    te = gen.pipeline.components["text_encoder"]
    te_bytes = sum(p.numel() * p.element_size() for p in te.parameters())
    tp = gen.parallel.tp_size if gen.parallel is not None else 1
    print(f"rank {rank}: sequence={type(stage.call.sequence).__name__} cfg={type(stage.cfg).__name__} "
          f"tp={tp} dit_bytes={dit_bytes} te_bytes={te_bytes}", flush=True)
    video = gen.generate(request.pop("prompt"), latents=latents, output_path=out, callback=callback, **request)
    if gen.is_main_process and video.cache:  # the feature cache's report, as the request's result has it
        with open(out + ".cache.json", "w") as f:
            json.dump(video.cache, f)


def decode_tiles(model_dir: str, engine: dict, request: dict, out: str) -> None:
    """The parallel tiled VAE decode alone, on given latents; rank 0 saves the video."""
    import numpy as np

    from vidloom import VideoGenerator

    gen = VideoGenerator.from_pretrained(model_dir, dtype="fp32", **engine)
    stage = gen.pipeline.decoding
    z = torch.load(request["latents_path"])
    with torch.inference_mode(), stage.vae.use() as vae:  # as the decoding stage runs it
        video = vae.decode_tiled(z, tile_latent=request["tile"], overlap_latent=request["overlap"],
                                 map_tiles=stage.map_tiles)
    if gen.is_main_process:
        np.save(out, video.cpu().numpy())


if __name__ == "__main__":
    main()
