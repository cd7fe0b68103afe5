"""Idefics3 (``Idefics3ForConditionalGeneration``, SmolVLM lineage): SigLIP-style vision
tower, a connector that pixel-shuffles each crop's patch grid (``scale_factor`` x
``scale_factor`` patches per token) and projects it with one matrix (no hidden layer, so no
projector neurons), and a Llama language model.

The processor splits an image into a grid of crops, row by row, then adds a global view
(the whole image resized to one crop); a small image is its global view alone. In the
prompt every crop's tokens follow ``<fake_token_around_image><row_i_col_j>``, the global
view's ``<fake_token_around_image><global-img>``, and each row of crops ends with a newline:
those are text and special tokens, the image tokens are ``<image>``. ``pixel_values`` is
``[batch, crops, 3, height, width]``, padded with all-zero crops that HF drops before the
vision tower.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge.supported_architectures.idefics3 import Idefics3ArchitectureAdapter

from mm_lens.model.architectures.bridge_components import MediaEmbeddingAdapter
from mm_lens.model.architectures.spec import ArchitectureSpec
from mm_lens.model.architectures.gemma3 import GEMMA3
from mm_lens.model.architectures.llava import with_neuron_hooks
from mm_lens.base.modality import ImageLayout

# Declared by TransformerLens' bridges but never called by HF's forward here (as for Gemma 3),
# and the embeddings' hook_in: HF passes them pixel_values by keyword, which TL's hook_in skips
# (vision_encoder.hook_in holds the same tensor).
INERT_HOOKS = (*GEMMA3.inert_hooks, "vision_encoder.embeddings.hook_in")
_TAG_AND_FAKE = 2  # tokens between two crops of one row: <fake_token_around_image> and <row_i_col_j>


class Idefics3NeuronAdapter(MediaEmbeddingAdapter, Idefics3ArchitectureAdapter):
    """TransformerLens' Idefics3 adapter plus ``mlp.hook_act``."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        with_neuron_hooks(self, projector=False)


def _token_side(config: Any) -> int:
    """Tokens per side of one crop after the pixel shuffle."""
    return config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor


def _runs(row: Int[Tensor, "pos"], token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of ``token_id`` in one row."""
    is_token = torch.cat([torch.tensor([False]), row == token_id, torch.tensor([False])]).int()
    edges = is_token.diff()
    return list(zip(torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist()))


def _real_crops(pixel_values: Float[Tensor, "batch crops 3 height width"]) -> Int[Tensor, "batch"]:
    """Crops per batch row that HF encodes: those not all zero."""
    return (pixel_values != 0).flatten(2).any(-1).sum(-1)


def _split_layout(crops: int, cols: int, side: int) -> ImageLayout:
    """``crops`` crops (``cols`` a row, row-major), then the global view: crop ``k`` is tile
    ``k + 1`` with row/col on the assembled crop grid, the global view is tile 0."""
    t = torch.arange(side * side)
    r, c = t // side, t % side
    tiles = list(range(1, crops + 1)) + [0]
    rows = crops // cols if crops else 0
    return ImageLayout(
        tile=torch.tensor(tiles).repeat_interleave(side * side),
        row=torch.cat([((k - 1) // cols) * side + r for k in tiles[:-1]] + [r]),
        col=torch.cat([((k - 1) % cols) * side + c for k in tiles[:-1]] + [c]),
        feature=torch.arange((crops + 1) * side * side),
        newline=torch.zeros((crops + 1) * side * side, dtype=torch.bool),
        grids=((side, side), (rows * side, cols * side)) if crops else ((side, side),),
        n_features=(crops + 1) * side * side,
        n_tiles=crops + 1,
    )


def _image_columns(starts: list[int], ends: list[int]) -> int:
    """Crops per row of one split image from the gaps between its crops' token runs: a gap
    longer than the fake token and the crop tag holds the row's closing newline."""
    breaks = [k + 1 for k in range(len(starts) - 1) if starts[k + 1] - ends[k] > _TAG_AND_FAKE]
    cols = breaks[0] if breaks else len(starts)
    if breaks != list(range(cols, len(starts), cols)) or len(starts) % cols:
        raise ValueError(
            f"the crops' image tokens do not form a grid (row breaks after crops {breaks}); build inputs with the model's processor"
        )
    return cols


def _idefics3_layouts(config: Any, inputs: Mapping[str, Any]) -> list[ImageLayout]:
    """One layout per image, read from the runs of image tokens in ``input_ids`` (one run of
    ``side ** 2`` tokens per crop; the token before a run names it: the global view's
    ``<global-img>`` ends each image)."""
    if inputs.get("pixel_values") is None:
        return []
    input_ids, side = inputs["input_ids"].cpu(), _token_side(config)
    runs = [_runs(row, config.image_token_id) for row in input_ids]
    if any(end - start != side * side for row in runs for start, end in row):
        raise ValueError(
            f"image tokens must come in runs of {side * side} (one run per crop); build the prompt with the model's processor"
        )
    tags = {int(input_ids[b, row[-1][0] - 1]) for b, row in enumerate(runs) if row}
    if len(tags) != 1 or any(row and row[0][0] == 0 for row in runs):
        raise ValueError(
            "every image must end with its global view (<global-img> before its image tokens); "
            "build the prompt with the model's processor"
        )
    (global_tag,) = tags
    layouts = []
    for b, row in enumerate(runs):
        starts, ends = [], []
        for start, end in row:
            if int(input_ids[b, start - 1]) != global_tag:
                starts.append(start)
                ends.append(end)
                continue
            if starts and start - ends[-1] <= _TAG_AND_FAKE:
                raise ValueError(
                    "the tokenizer drops the newlines Idefics3's processor writes after each row of crops; "
                    "mm_lens reads the crop grid from them"
                )
            layouts.append(_split_layout(len(starts), _image_columns(starts, ends) if starts else 1, side))
            starts, ends = [], []
    return layouts


def _check_idefics3_inputs(config: Any, inputs: Mapping[str, Any]) -> None:
    """``pixel_values`` ``[batch, crops, 3, height, width]`` with a matching
    ``pixel_attention_mask``, and as many non-padding crops in each row as runs of image
    tokens (HF encodes exactly those crops)."""
    pixel_values = inputs.get("pixel_values")
    if pixel_values is None:
        return
    if pixel_values.ndim != 5:
        raise ValueError(f"pixel_values must be [batch, crops, 3, height, width], got shape {tuple(pixel_values.shape)}")
    mask = inputs.get("pixel_attention_mask")
    if mask is not None and tuple(mask.shape) != (*pixel_values.shape[:2], *pixel_values.shape[3:]):
        raise ValueError(
            f"pixel_attention_mask has shape {tuple(mask.shape)} but pixel_values {tuple(pixel_values.shape)}; "
            "build them together with the model's processor"
        )
    if pixel_values.shape[0] != inputs["input_ids"].shape[0]:
        raise ValueError(
            f"pixel_values hold {pixel_values.shape[0]} rows but input_ids {inputs['input_ids'].shape[0]}; one row of crops per prompt"
        )
    runs = torch.tensor([len(_runs(row, config.image_token_id)) for row in inputs["input_ids"].cpu()])
    crops = _real_crops(pixel_values).cpu()
    if not torch.equal(runs, crops):
        raise ValueError(
            f"rows of pixel_values hold {crops.tolist()} crops (all-zero crops are padding) but input_ids "
            f"{runs.tolist()} runs of image tokens; build inputs with the model's processor"
        )


IDEFICS3 = ArchitectureSpec(
    hf_class="Idefics3ForConditionalGeneration",
    adapter=Idefics3NeuronAdapter,
    neuron_hooks=GEMMA3.neuron_hooks,  # the language model's and the vision tower's MLPs
    neuron_widths=GEMMA3.neuron_widths,
    layouts=_idefics3_layouts,
    input_names=("pixel_values", "pixel_attention_mask"),
    inert_hooks=INERT_HOOKS,
    check_inputs=_check_idefics3_inputs,
    image_geometry="whole",  # the global view is the squashed picture; the crops tile the picture resized to whole crops
)
SPECS = (IDEFICS3,)
