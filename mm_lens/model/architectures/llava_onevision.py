"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP vision tower, two-layer
projector, Qwen2 language model.

Images: a lone image of its prompt is tiled as LLaVA-NeXT's anyres (base view, then the
unpadded high-resolution grid with one newline per row), the grid downsized bilinearly when
it exceeds ``vision_aspect_ratio`` (``anyres_max_N``: about N views); an image sharing its
prompt with others (``batch_num_images`` > 1) is its base view plus one newline. Videos:
every frame's patch grid is resized bilinearly to half its side, frames in order, then one
newline.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Mapping, no_type_check

import torch
from transformer_lens.model_bridge.supported_architectures.llava_onevision import LlavaOnevisionArchitectureAdapter
from transformers import AutoProcessor, LlavaOnevisionConfig, LlavaOnevisionProcessor

from mm_lens.model.architectures.bridge_components import MediaEmbeddingAdapter
from mm_lens.model.architectures.image_text_processor import ImageTextProcessor
from mm_lens.model.architectures.llava import (
    LLAVA,
    anyres_grid,
    anyres_layout,
    check_image_sizes,
    grid_layout,
    patch_grid,
    with_neuron_hooks,
)
from mm_lens.base.modality import ImageLayout


class ImageOnlyLlavaOnevisionProcessor(ImageTextProcessor, LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` for images and text only (no torchvision needed); load one
    with ``ImageOnlyLlavaOnevisionProcessor.from_pretrained(folder)`` (a checkpoint's own
    processor files serve)."""

    @no_type_check  # HF reads the parameter names off __init__.__code__: no type-checking wrapper here
    def __init__(  # named, as HF passes a saved processor's settings only to named parameters
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        vision_aspect_ratio: str = "anyres_max_9",
    ):
        super().__init__(
            image_processor,
            tokenizer,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            vision_aspect_ratio=vision_aspect_ratio,
        )


# A saved processor names its class; AutoProcessor finds this one through its public registry
# (checkpoints naming LlavaOnevisionProcessor still get HF's own).
AutoProcessor.register(LlavaOnevisionConfig, ImageOnlyLlavaOnevisionProcessor, exist_ok=True)


class LlavaOnevisionNeuronAdapter(MediaEmbeddingAdapter, LlavaOnevisionArchitectureAdapter):
    """TransformerLens' LLaVA-OneVision adapter plus ``mlp.hook_act`` and ``vision_projector.hook_hidden``."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        with_neuron_hooks(self)


def _with_newline(layout: ImageLayout) -> ImageLayout:
    """``layout`` followed by one newline token."""
    return replace(
        layout,
        tile=torch.cat([layout.tile, torch.tensor([-1])]),
        row=torch.cat([layout.row, torch.tensor([-1])]),
        col=torch.cat([layout.col, torch.tensor([-1])]),
        feature=torch.cat([layout.feature, torch.tensor([-1])]),
        newline=torch.cat([layout.newline, torch.tensor([True])]),
    )


def _image_layout(config: Any, image_size: tuple[int, int], alone: bool) -> ImageLayout:
    side = patch_grid(config)
    if not alone:
        return _with_newline(grid_layout(side, with_cls=False))
    grid = anyres_grid(config, image_size)
    max_views = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(grid.rows * grid.cols / (max_views * side**2))
    shape = (int(grid.rows // ratio), int(grid.cols // ratio)) if ratio > 1.1 else None
    return anyres_layout(config, image_size, shape)


def _video_layout(config: Any, frames: int) -> ImageLayout:
    """Each frame's grid resized to ``ceil(side / 2)`` square, frame after frame, then one
    newline; ``tile`` is the frame and ``feature`` indexes the video's pooled features."""
    pooled = math.ceil(patch_grid(config) / 2)
    r, c = torch.meshgrid(torch.arange(pooled), torch.arange(pooled), indexing="ij")
    n = frames * pooled * pooled
    frame_grid = ImageLayout(
        tile=torch.arange(frames).repeat_interleave(pooled * pooled),
        row=r.flatten().repeat(frames),
        col=c.flatten().repeat(frames),
        feature=torch.arange(n),
        newline=torch.zeros(n, dtype=torch.bool),
        grids=((pooled, pooled),),
        n_features=n,
        n_tiles=frames,
        modality="video",
    )
    return _with_newline(frame_grid)


def _alone(inputs: Mapping[str, Any], n_images: int) -> list[bool]:
    """Per image: whether it is its prompt's only image (HF tiles those only)."""
    per_prompt = inputs.get("batch_num_images")
    if per_prompt is None:
        return [True] * n_images
    return [int(n) == 1 for n in per_prompt for _ in range(int(n))]


def _llava_onevision_layouts(config: Any, inputs: Mapping[str, Any]) -> list[ImageLayout]:
    """Images (in prompt order), then videos."""
    pixel_values, videos = inputs.get("pixel_values"), inputs.get("pixel_values_videos")
    layouts = []
    if config.vision_feature_select_strategy != "full":
        raise ValueError("LLaVA-OneVision layouts are defined for vision_feature_select_strategy='full' only (SigLIP has no CLS)")
    if pixel_values is not None:
        if inputs.get("image_sizes") is None:
            raise ValueError("LLaVA-OneVision needs image_sizes with pixel_values; build inputs with the model's processor")
        sizes = torch.as_tensor(inputs["image_sizes"]).tolist()
        layouts += [_image_layout(config, (h, w), alone) for (h, w), alone in zip(sizes, _alone(inputs, len(sizes)))]
    if videos is not None:
        layouts += [_video_layout(config, videos.shape[1]) for _ in range(videos.shape[0])]
    return layouts


def _check_onevision_inputs(config: Any, inputs: Mapping[str, Any]) -> None:
    """One ``image_sizes`` row per image, ``batch_num_images`` summing to the images, videos
    as ``[videos, frames, 3, height, width]``."""
    check_image_sizes(config, inputs)
    per_prompt, pixel_values = inputs.get("batch_num_images"), inputs.get("pixel_values")
    if per_prompt is not None and pixel_values is not None and int(torch.as_tensor(per_prompt).sum()) != len(pixel_values):
        raise ValueError(
            f"batch_num_images count {int(torch.as_tensor(per_prompt).sum())} images but pixel_values hold "
            f"{len(pixel_values)}; build inputs with the model's processor"
        )
    videos = inputs.get("pixel_values_videos")
    if videos is not None and videos.ndim != 5:
        raise ValueError(f"pixel_values_videos must be [videos, frames, 3, height, width], got shape {tuple(videos.shape)}")


LLAVA_ONEVISION = replace(
    LLAVA,
    hf_class="LlavaOnevisionForConditionalGeneration",
    adapter=LlavaOnevisionNeuronAdapter,
    layouts=_llava_onevision_layouts,
    input_names=("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos"),
    feature_inputs={"image": "pixel_values", "video": "pixel_values_videos"},
    token_attributes={"image": "image_token_id", "video": "video_token_id"},
    check_inputs=_check_onevision_inputs,
    nested_images=True,
    encoder_modalities=("image", "video"),  # the tower runs on the images, then on the videos  # as HF's examples call it: images sharing a prompt then take the base view only
)
SPECS = (LLAVA_ONEVISION,)
