"""The tests run mm_lens under jaxtyping's import hook (tests/conftest.py): a call whose
tensors break a function's annotated shapes or dtypes fails with ``TypeCheckError``."""

from __future__ import annotations

import pytest
import torch
from jaxtyping import TypeCheckError

from mm_lens.analysis.similarity import centered_mean_cosine, linear_cka
from mm_lens.neurons.miner import min_max_normalize


def test_a_call_with_the_annotated_shapes_passes():
    cosine = centered_mean_cosine(torch.randn(3, 8), torch.randn(8))  # [modality, d_model], [d_model]
    assert cosine.shape == (3, 3)


def test_mismatched_dimensions_fail_the_check():
    with pytest.raises(TypeCheckError, match="center"):
        centered_mean_cosine(torch.randn(3, 8), torch.randn(5))  # d_model 8 vs 5


def test_a_wrong_dtype_fails_the_check():
    with pytest.raises(TypeCheckError, match="means"):
        centered_mean_cosine(torch.ones(3, 8, dtype=torch.long), torch.randn(8))  # Float expected


def test_a_wrong_rank_fails_the_check():
    with pytest.raises(TypeCheckError):
        min_max_normalize(torch.tensor(1.0))  # [*layer, neuron] needs at least one axis


def test_a_validating_function_keeps_its_messages_and_its_core_is_checked():
    """``linear_cka`` checks the sample counts itself (a ``ValueError`` that says what is
    wrong); the shapes and dtypes of what passes go on to its checked core."""
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(torch.randn(4, 2), torch.randn(5, 2))
    with pytest.raises(TypeCheckError):
        linear_cka(torch.ones(4, 2, dtype=torch.long), torch.ones(4, 3, dtype=torch.long))
