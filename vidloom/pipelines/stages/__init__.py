"""One file per stage."""

from .decoding import DecodingStage
from .denoising import DenoisingStage, Expert
from .image_encoding import ImageEncodingStage
from .input_validation import InputValidationStage
from .latent_preparation import LatentPreparationStage
from .text_encoding import TextEncodingStage
from .timestep_preparation import TimestepPreparationStage

__all__ = [
    "DecodingStage", "DenoisingStage", "Expert", "ImageEncodingStage", "InputValidationStage", "LatentPreparationStage",
    "TextEncodingStage", "TimestepPreparationStage",
]
