"""Direct logit attribution at every position, image patches included: how much each head,
MLP and the embedding write toward an answer token and away from a wrong one, read where
they write it.

Decisions:

- **Exact, not approximate.** Shares use the final norm's scale cached by the forward, so
  they are linear in the residual and sum, over the components, to the model's own logit
  difference at every position (less the unembedding bias difference, kept as ``bias``).
  The edge checks this on every call and warns when it fails (e.g. an untested release).
- **Media positions are first-class.** ``hook_embed`` holds what the language model
  receives (``MediaEmbeddingBridge``): at an image position the ``embed`` share is the
  projected image feature's own, not the placeholder token's.
- **Heads through any norm that follows attention.** A head's share is its
  ``z_h @ W_O[h]`` read along the answer direction; a norm after attention (Gemma 3) is
  applied linearly with its cached scale and gain, so heads still add up to the layer.
- **The final norm's gain is used in and out of compatibility mode** (where it is folded
  into ``W_U`` and is 1), unlike TransformerLens' ``logit_attrs``, which assumes it folded.
- **Answer and wrong tokens** default to each row's top two tokens at its last position.

The tensor maths is ``mm_lens.analysis.direct_attribution_core``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mm_lens.analysis.direct_attribution_core import (
    component_attribution,
    head_attribution,
    logit_direction,
    mean_over,
)
from mm_lens.base.display import figure_and_axes, text_table
from mm_lens.base.fast_path import mismatch, warn_fallback
from mm_lens.base.hooks import block_hook
from mm_lens.base.io import load_tensors, save_tensors
from mm_lens.base.modality import ModalityMap, position_mask
from mm_lens.model.hooked import HookedMLLM
from mm_lens.model.inputs import MultimodalBatch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FILE_NAME = "direct_attribution.safetensors"
_MAP_FIELDS = ("modality", "image", "tile", "row", "col", "feature", "newline", "last", "image_row", "image_tiles")
Tokens = int | str | Sequence[int | str] | Tensor | None


@dataclass
class DirectAttribution:
    """Direct logit attribution of one batch at every position.

    ``attribution[c, b, p]``: component ``labels[c]``'s share of row ``b``'s logit
    difference (``answer_tokens[b]`` minus ``wrong_tokens[b]``) read at position ``p``.
    Components: ``embed`` (at media positions the media features the language model
    receives), each head ``L{l}H{h}`` (or each attention layer ``{l}_attn_out``) and each MLP
    ``{l}_mlp_out``. ``logit_diff[b, p]``: the model's own logit difference there; the shares
    plus ``bias[b]`` (the unembedding bias difference) sum to it. ``modality_map``: the
    batch's, for masks and patch grids.
    """

    attribution: Float[Tensor, "component batch pos"]
    labels: list[str]
    logit_diff: Float[Tensor, "batch pos"]
    bias: Float[Tensor, "batch"]
    answer_tokens: Int[Tensor, "batch"]
    wrong_tokens: Int[Tensor, "batch"]
    modality_map: ModalityMap
    n_layers: int
    heads: bool = True
    answer_text: tuple[str, ...] = ()
    wrong_text: tuple[str, ...] = ()

    def __getitem__(self, label: str) -> Float[Tensor, "batch pos"]:
        """One component's shares ``[batch, pos]``."""
        if label not in self.labels:
            raise KeyError(f"no component {label!r}; components are embed, L<layer>H<head> or <layer>_attn_out, <layer>_mlp_out")
        return self.attribution[self.labels.index(label)]

    def sum_error(self) -> float:
        """Largest gap, over non-padding positions, between the shares' sum (plus ``bias``)
        and the model's logit difference: 0 up to rounding."""
        keep = ~self.modality_map.mask("padding")
        total = self.attribution.sum(0) + self.bias[:, None]
        return float((total - self.logit_diff)[keep].abs().max())

    def mean(self, positions: str | Sequence[str] | Tensor = "image") -> Float[Tensor, "component"]:
        """Each component's mean share over ``positions`` (names of ``POSITIONS`` or a
        ``[batch, pos]`` bool mask) of every row."""
        mask = position_mask(self.modality_map, positions)
        if not mask.any():
            raise ValueError(f"no position of the batch is {positions!r}")
        return mean_over(self.attribution, mask)

    def top(self, positions: str | Sequence[str] | Tensor = "image", k: int = 10) -> list[str]:
        """The ``k`` components of largest mean |share| over ``positions``, largest first."""
        order = self.mean(positions).abs().argsort(descending=True)
        return [self.labels[i] for i in order[:k].tolist()]

    def to_grid(self, label: str, image: int = 0, view: int = 0) -> Float[Tensor, "rows cols"]:
        """One component's shares on image ``image``'s patch grid (view 0 base, 1 high
        resolution; NaN where no token)."""
        return self.modality_map.to_grid(self[label], image, view)

    def by_layer(self, positions: str | Sequence[str] | Tensor = "image") -> Float[Tensor, "layer column"]:
        """Mean shares over ``positions`` as ``[layer, column]``: the heads (or the attention
        layer), then the MLP."""
        means = self.mean(positions)
        return means[1:].reshape(self.n_layers, -1)  # labels: embed, then per layer its attention columns and the MLP

    def table(self, positions: str | Sequence[str] | Tensor = "image", k: int = 10) -> str:
        """The ``k`` components of largest mean |share| over ``positions``: that mean, and
        the mean at each row's last position."""
        at, last = self.mean(positions), self.mean("last")
        rows = [[label, f"{float(at[i]):+.4f}", f"{float(last[i]):+.4f}"] for label, i in ((l, self.labels.index(l)) for l in self.top(positions, k))]
        pairs = ", ".join(f"{a!r} - {w!r}" for a, w in zip(self.answer_text, self.wrong_text)) or "answer - wrong"
        title = f"direct logit attribution of {pairs} (mean share)"
        return title + "\n" + text_table(["component", _name(positions), "last"], rows)

    def plot(self, positions: str | Sequence[str] | Tensor = "image", ax: Axes | None = None) -> Figure:
        """Heatmap of the mean share over ``positions``, layer x (heads, MLP); the
        embedding's share in the title."""
        grid = self.by_layer(positions)
        fig, ax = figure_and_axes(ax, size=(0.5 * grid.shape[1] + 3, 0.35 * self.n_layers + 2))
        limit = float(grid.abs().max()) or 1.0
        shown = ax.imshow(grid.numpy(), aspect="auto", cmap="RdBu", vmin=-limit, vmax=limit)
        columns = [f"H{h}" for h in range(grid.shape[1] - 1)] if self.heads else ["attn"]
        ax.set_xticks(range(grid.shape[1]), [*columns, "MLP"])
        ax.set_yticks(range(self.n_layers), [str(l) for l in range(self.n_layers)])
        ax.set_ylabel("layer")
        embed = float(self.mean(positions)[0])
        ax.set_title(f"direct logit attribution at {_name(positions)} positions (embed {embed:+.3f})")
        fig.colorbar(shown, ax=ax)
        return fig

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``folder/direct_attribution.safetensors`` (shares, tokens, the batch's map)."""
        mm = self.modality_map
        tensors = {
            "attribution": self.attribution, "logit_diff": self.logit_diff, "bias": self.bias,
            "answer_tokens": self.answer_tokens, "wrong_tokens": self.wrong_tokens,
        } | {f"map.{name}": getattr(mm, name) for name in _MAP_FIELDS}
        header = {
            "labels": self.labels, "n_layers": self.n_layers, "heads": self.heads,
            "answer_text": list(self.answer_text), "wrong_text": list(self.wrong_text),
            "grids": [[list(grid) for grid in item] for item in mm.grids], "item_modality": list(mm.item_modality),
        }
        save_tensors(Path(folder) / FILE_NAME, tensors, header, "DirectAttribution", overwrite)
        return Path(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> DirectAttribution:
        """Read a folder written by ``save``."""
        file = Path(folder) / FILE_NAME
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found; pass a folder written by DirectAttribution.save")
        tensors, header = load_tensors(file, "DirectAttribution")
        mm = ModalityMap(
            **{name: tensors[f"map.{name}"] for name in _MAP_FIELDS},
            grids=tuple(tuple(tuple(grid) for grid in item) for item in header["grids"]),
            item_modality=tuple(header["item_modality"]),
        )
        return cls(
            tensors["attribution"], header["labels"], tensors["logit_diff"], tensors["bias"], tensors["answer_tokens"],
            tensors["wrong_tokens"], mm, header["n_layers"], header["heads"], tuple(header["answer_text"]), tuple(header["wrong_text"]),
        )


def _name(positions: str | Sequence[str] | Tensor) -> str:
    """How a ``positions=`` argument reads in a title."""
    return "chosen" if isinstance(positions, Tensor) else positions if isinstance(positions, str) else "+".join(positions)


def _token_ids(model: HookedMLLM, tokens: Tokens, rows: int, what: str) -> Int[Tensor, "batch"]:
    """One token id per row from an id, a single-token string, or one of those per row."""
    if isinstance(tokens, (int, str)) or (isinstance(tokens, Tensor) and tokens.ndim == 0):
        tokens = [tokens] * rows
    ids = []
    for token in tokens:
        if isinstance(token, str):
            pieces = model.processor.tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise ValueError(f"{what} {token!r} is {len(pieces)} tokens {pieces}; pass single tokens or token ids")
            token = pieces[0]
        ids.append(int(token))
    if len(ids) != rows:
        raise ValueError(f"{what} has {len(ids)} entries for a batch of {rows} rows; pass one token or one per row")
    vocab = model.cfg.d_vocab_out
    if any(not 0 <= i < vocab for i in ids):
        raise ValueError(f"{what} {ids} must lie in [0, {vocab}) (the vocabulary)")
    return torch.tensor(ids, dtype=torch.long)


def _gain(norm: Any) -> Tensor:
    """The per-channel gain a normalisation bridge multiplies by (``1 + w`` for Gemma's)."""
    weight = norm.original_component.weight.detach().float()
    return 1.0 + weight if norm.uses_weight_offset else weight


def direct_logit_attribution(
    model: HookedMLLM,
    batch: MultimodalBatch | Mapping[str, Any],
    answer_tokens: Tokens = None,
    wrong_tokens: Tokens = None,
    *,
    heads: bool = True,
) -> DirectAttribution:
    """Direct logit attribution of ``batch`` at every position (one forward).

    ``answer_tokens`` / ``wrong_tokens``: one token (id or single-token string) for all rows
    or one per row; by default each row's top and runner-up tokens at its last position.
    ``heads``: one component per head (default) or per attention layer.
    """
    if not isinstance(batch, MultimodalBatch):
        batch = MultimodalBatch(dict(batch), model.modality_map(batch))
    mm, bridge = batch.modality_map, model.bridge
    post_norms = [getattr(block, "ln1_post", None) for block in bridge.blocks]  # Gemma 3: a norm after attention
    names = ["hook_embed", "ln_final.hook_scale"]
    for layer, post in enumerate(post_norms):
        names.append(block_hook(layer, "mlp_out"))
        names += [block_hook(layer, "attn.hook_z")] if heads else [block_hook(layer, "attn_out")]
        if heads and post is not None:
            names.append(block_hook(layer, "ln1_post.hook_scale"))
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch, names_filter=names)
    device = logits.device
    rows = torch.arange(mm.shape[0], device=device)
    ranked = logits[rows, mm.last.to(device)].topk(2, dim=-1).indices.cpu()
    answer = ranked[:, 0] if answer_tokens is None else _token_ids(model, answer_tokens, len(rows), "answer_tokens")
    wrong = ranked[:, 1] if wrong_tokens is None else _token_ids(model, wrong_tokens, len(rows), "wrong_tokens")

    direction = logit_direction(bridge.unembed.W_U.detach().float(), _gain(bridge.ln_final).to(device), answer.to(device), wrong.to(device))
    scale = cache["ln_final.hook_scale"].float()
    shares, labels = [component_attribution(cache["hook_embed"].float(), direction, scale)], ["embed"]
    for layer, post in enumerate(post_norms):
        if heads:
            along, by = direction, scale
            if post is not None:
                along = direction * _gain(post).to(device)
                by = scale * cache[block_hook(layer, "ln1_post.hook_scale")].float()
            W_O = bridge.blocks[layer].attn.W_O.detach().float()
            shares += list(head_attribution(cache[block_hook(layer, "attn.hook_z")].float(), W_O, along, by))
            labels += [f"L{layer}H{h}" for h in range(W_O.shape[0])]
        else:
            shares.append(component_attribution(cache[block_hook(layer, "attn_out")].float(), direction, scale))
            labels.append(f"{layer}_attn_out")
        shares.append(component_attribution(cache[block_hook(layer, "mlp_out")].float(), direction, scale))
        labels.append(f"{layer}_mlp_out")

    b_U = bridge.unembed.b_U.detach().float().cpu()
    decode = model.processor.tokenizer.convert_ids_to_tokens
    result = DirectAttribution(
        attribution=torch.stack(shares).cpu(),
        labels=labels,
        logit_diff=(logits[rows, :, answer.to(device)].float() - logits[rows, :, wrong.to(device)].float()).cpu(),
        bias=b_U[answer] - b_U[wrong],
        answer_tokens=answer,
        wrong_tokens=wrong,
        modality_map=mm,
        n_layers=len(post_norms),
        heads=heads,
        answer_text=tuple(decode(answer.tolist())),
        wrong_text=tuple(decode(wrong.tolist())),
    )
    keep = ~mm.mask("padding")
    problem = mismatch((result.attribution.sum(0) + result.bias[:, None])[keep], result.logit_diff[keep])
    if problem is not None:
        warn_fallback("direct logit attribution", problem, "the shares do not add up to the model's logit difference")
    return result
