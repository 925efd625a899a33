"""BAGEL / ThinkMorph understanding path as a native transformers model (see docs/models.md)."""

from transformers import AutoConfig, AutoModelForImageTextToText

from .configuration_bagel import BagelConfig, BagelTextConfig, BagelVisionConfig
from .modeling_bagel import BagelForConditionalGeneration, BagelModel
from .processing_bagel import IMAGE_SKIP_MARKER, BagelImageProcessor, BagelProcessor


def _register() -> None:
    # Lets AutoConfig / AutoModelForImageTextToText (e.g. TRL's model loading) resolve model_type "bagel".
    for name, cls in (("bagel", BagelConfig), ("bagel_text", BagelTextConfig), ("bagel_vision", BagelVisionConfig)):
        try:
            AutoConfig.register(name, cls)
        except ValueError:
            pass  # already registered
    try:
        AutoModelForImageTextToText.register(BagelConfig, BagelForConditionalGeneration)
    except ValueError:
        pass


_register()

__all__ = [
    "IMAGE_SKIP_MARKER",
    "BagelConfig",
    "BagelForConditionalGeneration",
    "BagelImageProcessor",
    "BagelModel",
    "BagelProcessor",
    "BagelTextConfig",
    "BagelVisionConfig",
]
