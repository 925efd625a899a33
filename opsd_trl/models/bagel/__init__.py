"""BAGEL / ThinkMorph understanding path as a native transformers model (see docs/models.md)."""

from transformers import AutoConfig, AutoModelForImageTextToText

from ..adapters import register_adapter
from .adapter import BagelAdapter
from .configuration_bagel import BagelConfig, BagelTextConfig, BagelVisionConfig
from .modeling_bagel import BagelForConditionalGeneration, BagelModel
from .processing_bagel import BagelImageProcessor, BagelProcessor


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
    register_adapter("bagel", BagelAdapter)  # the teacher pass (opsd_trl.models.adapters.get_adapter)


_register()

__all__ = [
    "BagelAdapter",
    "BagelConfig",
    "BagelForConditionalGeneration",
    "BagelImageProcessor",
    "BagelModel",
    "BagelProcessor",
    "BagelTextConfig",
    "BagelVisionConfig",
]
