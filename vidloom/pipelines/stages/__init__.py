"""One file per stage."""

from .decoding import DecodingStage
from .denoising import DenoisingStage, Expert
from .input_validation import InputValidationStage
from .latent_preparation import LatentPreparationStage
from .text_encoding import TextEncodingStage
from .timestep_preparation import TimestepPreparationStage

__all__ = [
    "DecodingStage", "DenoisingStage", "Expert", "InputValidationStage", "LatentPreparationStage",
    "TextEncodingStage", "TimestepPreparationStage",
]
