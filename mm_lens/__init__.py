"""mm_lens: multimodal LLMs as first-class citizens of TransformerLens."""

from mm_lens.base.compat import warn_if_untested

warn_if_untested()  # first: an untested transformers may break the imports below

from mm_lens.model.architectures import ARCHITECTURES, UnsupportedArchitectureError
from mm_lens.model.inputs import MultimodalBatch
from mm_lens.base.modality import MODALITIES, ImageLayout, ModalityMap
from mm_lens.model.hooked import HookedMLLM

__all__ = [
    "ARCHITECTURES",
    "HookedMLLM",
    "ImageLayout",
    "MODALITIES",
    "ModalityMap",
    "MultimodalBatch",
    "UnsupportedArchitectureError",
]
