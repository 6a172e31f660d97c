"""One file per stage."""

from .decoding import DecodingStage
from .denoising import ConcatCondition, DenoisingStage, Expert, GivenFrames, ModelInput
from .image_encoding import FirstFrameStage, ImageEncodingStage
from .input_validation import InputValidationStage
from .latent_preparation import LatentPreparationStage
from .refine import RefineStage
from .text_encoding import PromptCache, TextEncodingStage
from .timestep_preparation import TimestepPreparationStage

__all__ = [
    "ConcatCondition", "DecodingStage", "DenoisingStage", "Expert", "FirstFrameStage", "GivenFrames", "ImageEncodingStage",
    "InputValidationStage", "LatentPreparationStage", "ModelInput", "PromptCache", "RefineStage", "TextEncodingStage", "TimestepPreparationStage",
]
