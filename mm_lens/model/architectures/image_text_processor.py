"""HF processors without their video processor.

In transformers 5 the Qwen-VL and LLaVA-OneVision processors cannot be built without a
video processor, and their video processors need torchvision. ``ImageTextProcessor`` is
mixed in before HF's processor class: the same images, text, chat template and extra inputs
from HF's own code, no video processor, and a clear error when videos are passed.
"""

from __future__ import annotations

from typing import Any, no_type_check


class ImageTextProcessor:
    """Mixin: ``class X(ImageTextProcessor, SomeHFProcessor)`` is ``SomeHFProcessor`` for
    images and text only."""

    @no_type_check  # HF reads the parameter names off __init__.__code__: no type-checking wrapper here
    def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, **kwargs)

    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any) -> Any:
        if videos is not None:
            raise ValueError(
                f"{type(self).__name__} takes no videos (HF's video processor for this model needs torchvision); "
                "install torchvision and load the model's own processor (processor=AutoProcessor.from_pretrained(...))"
            )
        return super().__call__(images=images, text=text, **kwargs)
