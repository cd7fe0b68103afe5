"""Representation similarity functions against direct formulas."""

from __future__ import annotations

import math

import pytest
import torch

from mm_lens.analysis.similarity import centered_mean_cosine, linear_cka


def test_centered_mean_cosine_equals_pairwise_loop():
    torch.manual_seed(0)
    means, center = torch.randn(3, 7), torch.randn(7)
    result = centered_mean_cosine(means, center)
    for i in range(3):
        for j in range(3):
            a, b = means[i] - center, means[j] - center
            assert math.isclose(float(result[i, j]), float(a @ b / (a.norm() * b.norm())), abs_tol=1e-6)


def _cka_by_gram(x, y):
    """CKA through centred Gram matrices (HSIC form), an independent route."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ (x.double() @ x.double().T) @ h, h @ (y.double() @ y.double().T) @ h
    return (k * l).sum() / ((k * k).sum().sqrt() * (l * l).sum().sqrt())


def test_linear_cka_equals_gram_matrix_form():
    torch.manual_seed(1)
    x, y = torch.randn(20, 5), torch.randn(20, 9)
    assert torch.allclose(linear_cka(x, y), _cka_by_gram(x, y))


def test_linear_cka_is_invariant_to_rotation_and_scale():
    torch.manual_seed(2)
    x = torch.randn(30, 6)
    rotation = torch.linalg.qr(torch.randn(6, 6)).Q
    assert torch.allclose(linear_cka(x, 3.0 * x @ rotation + 1.0), torch.tensor(1.0, dtype=torch.float64))


def test_linear_cka_rejects_unpaired_samples():
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(torch.randn(4, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        linear_cka(torch.randn(1, 2), torch.randn(1, 2))
