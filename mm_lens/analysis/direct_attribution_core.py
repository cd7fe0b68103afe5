"""Direct logit attribution's pure core: how much of a logit difference each component of
the residual stream writes, at every position. Tensors in, tensors out
(``mm_lens.analysis.direct_attribution`` is the model edge).

The final norm divides the residual at each position by one scale (RMS norm:
``rms(resid)``) and multiplies it by its gain ``g``; the logit difference of an answer and a
wrong token is then ``resid / scale . (g * (W_U[:, answer] - W_U[:, wrong]))`` plus the
unembedding bias difference. With the scale taken from the real forward (cached, not
recomputed per component) this is linear in the residual, so the residual's components
(embedding, every head, every MLP) split the logit difference exactly. A block norm that
follows a sublayer (Gemma 3's post-attention norm) is linear in the same way with its own
cached scale and gain, so its heads split through it too.
"""

from __future__ import annotations

from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor


def logit_direction(
    W_U: Float[Tensor, "d_model vocab"], gain: Float[Tensor, "d_model"], answer: Int[Tensor, "batch"], wrong: Int[Tensor, "batch"]
) -> Float[Tensor, "batch d_model"]:
    """The residual direction, after normalisation, of each row's answer-minus-wrong logit:
    the final norm's gain times the difference of the two unembedding columns."""
    return rearrange(gain, "d_model -> 1 d_model") * rearrange(W_U[:, answer] - W_U[:, wrong], "d_model batch -> batch d_model")


def component_attribution(
    component: Float[Tensor, "batch pos d_model"], direction: Float[Tensor, "batch d_model"], scale: Float[Tensor, "batch pos 1"]
) -> Float[Tensor, "batch pos"]:
    """A component's direct share of the logit difference at every position: divided by
    ``scale`` (the final residual's norm scale there) and read along the row's ``direction``."""
    return einsum(component / scale, direction, "batch pos d_model, batch d_model -> batch pos")


def head_attribution(
    z: Float[Tensor, "batch pos head d_head"],
    W_O: Float[Tensor, "head d_head d_model"],
    direction: Float[Tensor, "batch d_model"],
    scale: Float[Tensor, "batch pos 1"],
) -> Float[Tensor, "head batch pos"]:
    """Each head's direct share: what it writes (``z_h @ W_O[h]``), divided by ``scale`` and
    read along ``direction``, without forming the ``[head, batch, pos, d_model]`` results.
    For a block with a norm after attention, pass the direction times that norm's gain and
    the product of its scale and the final one."""
    along = einsum(W_O, direction, "head d_head d_model, batch d_model -> batch head d_head")
    shares = einsum(z, along, "batch pos head d_head, batch head d_head -> head batch pos")
    return shares / rearrange(scale, "batch pos 1 -> 1 batch pos")


def mean_over(values: Float[Tensor, "component batch pos"], mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, "component"]:
    """Each component's mean over the positions of a ``[batch, pos]`` bool ``mask`` (NaN
    when it selects none)."""
    chosen = rearrange(mask, "batch pos -> 1 batch pos").to(values.dtype)
    return einsum(values * chosen, "component batch pos -> component") / chosen.sum()
