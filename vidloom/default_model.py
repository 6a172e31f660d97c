"""The models that ship with vidloom, trained on the procedural world (``vidloom.world``), in
Diffusers layout inside the package.

- ``wan-shapes-64``: a small Wan2.1-architecture text-to-video model. ``vidloom generate`` and
  ``make demo`` use it when no ``--model`` is given; diffusers' ``WanPipeline`` loads the folder.
- ``wan-shapes-ti2v-64``: its image-to-video sibling in the Wan2.2 TI2V layout
  (``expand_timesteps``: the given image is the first latent frame, its tokens at timestep 0),
  the same VAE and text encoder; text-to-video from the same folder too. diffusers'
  ``WanImageToVideoPipeline(..., expand_timesteps=True)`` over its components gives the same video.

Both know captions of the form ``a {color} {shape} moving {direction}`` (colors red, green, blue,
yellow, magenta, white; shapes circle, square, triangle; directions left, right, up, down) at
64x64 pixels and 17 frames.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL_DIR = ASSETS / "wan-shapes-64"
DEFAULT_I2V_MODEL_DIR = ASSETS / "wan-shapes-ti2v-64"
# the size and settings they were trained and measured at (benchmarks/quality.py). Guidance 3, not
# the Wan pipelines' 5: at 5 with 20 steps the text-to-video model overshoots in its first latent
# frame (green objects start red, frames 0-4), at 3 every latent-frame span has the asked colour
# (see assets/wan-shapes-64/README.md for the sweep)
DEFAULT_MODEL_SAMPLING = dict(height=64, width=64, num_frames=17, num_inference_steps=20, guidance_scale=3.0)
DEFAULT_PROMPT = "a red circle moving right"
# the text-to-video model's step-distilled adapter (lora/distill-4step.safetensors): 4 steps without
# guidance, the settings in its file (vidloom.train.distill; assets/wan-shapes-64/README.md)
DISTILLED_ADAPTER = "distill-4step"
DEFAULT_I2V_PROMPT = "a yellow triangle moving up"  # the demo's first frame: the world draws this object


def sampling_defaults(folder: str | Path) -> dict:
    """The settings a request to ``folder`` starts from when it does not give them: the shipped
    models' own (``DEFAULT_MODEL_SAMPLING``) for their folders, however the path is spelled;
    nothing for any other folder (the engine's defaults, which are diffusers')."""
    try:
        resolved = Path(folder).resolve()
    except (OSError, RuntimeError):
        return {}
    return dict(DEFAULT_MODEL_SAMPLING) if resolved in (DEFAULT_MODEL_DIR, DEFAULT_I2V_MODEL_DIR) else {}
