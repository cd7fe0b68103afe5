"""How alike two modalities' representations are: cosine of centred means and linear CKA.

Pure functions on tensors; ``convergence.py`` feeds them per-layer residuals.
"""

from __future__ import annotations

from einops import rearrange, reduce
from jaxtyping import Float
from torch import Tensor


def centered_mean_cosine(
    means: Float[Tensor, "modality d_model"], center: Float[Tensor, "d_model"]
) -> Float[Tensor, "modality modality"]:
    """Cosine similarity between modality means after subtracting a common ``center``
    (e.g. the mean residual over all positions): 1 = same direction away from the centre."""
    centered = means - rearrange(center, "d_model -> 1 d_model")
    unit = centered / centered.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return unit @ unit.T


def linear_cka(x: Tensor, y: Tensor) -> Float[Tensor, ""]:
    """Linear centred kernel alignment (Kornblith et al., 2019) between two representations
    ``x`` ``[sample, d_x]`` and ``y`` ``[sample, d_y]`` of the same samples:
    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``, in [0, 1]. The sample counts are
    checked here (``ValueError`` saying what is wrong)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples and y {y.shape[0]}; CKA compares representations of the same samples")
    if x.shape[0] < 2:
        raise ValueError("linear CKA needs at least 2 samples")
    return _linear_cka(x, y)


def _linear_cka(x: Float[Tensor, "sample d_x"], y: Float[Tensor, "sample d_y"]) -> Float[Tensor, ""]:
    xc = x.double() - reduce(x.double(), "sample d -> 1 d", "mean")
    yc = y.double() - reduce(y.double(), "sample d -> 1 d", "mean")
    cross = (yc.T @ xc).norm() ** 2
    norm = (xc.T @ xc).norm() * (yc.T @ yc).norm()
    return cross / norm.clamp(min=1e-300)
