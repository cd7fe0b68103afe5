"""Fingerprints that tie a saved result or checkpoint to the model and the data it came from.

A model's fingerprint is its architecture, a digest of its config and a digest of its
weights: every tensor's name, shape and dtype, and a strided sample of at most 4,096 of its
values (fast on billions of parameters; two trained models that differ anywhere in a tensor
differ in its sample with overwhelming probability). A dataset's fingerprint is the HF
``datasets`` fingerprint of a ``Dataset`` or a digest of every sample's text fields and
media bytes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from mm_lens.model.hooked import HookedMLLM
from mm_lens.model.samples import Samples

SAMPLED_VALUES = 4096


def _digest(*parts: bytes) -> str:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part)
    return sha.hexdigest()[:16]


def model_fingerprint(model: HookedMLLM) -> dict[str, str]:
    """``{"architecture", "config", "weights"}`` of ``model`` (see the module docstring)."""
    config = model.hf_model.config.to_json_string(use_diff=False)
    weights = hashlib.sha256()
    for name, tensor in sorted(model.hf_model.state_dict().items()):
        flat = tensor.detach().flatten()
        step = max(1, flat.numel() // SAMPLED_VALUES)
        sample = flat[::step][:SAMPLED_VALUES].to("cpu", torch.float32).numpy()
        weights.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        weights.update(sample.tobytes())
    return {"architecture": model.spec.hf_class, "config": _digest(config.encode()), "weights": weights.hexdigest()[:16]}


def _media_bytes(value: Any) -> bytes:
    if value is None:
        return b"-"
    if isinstance(value, (list, tuple)):
        return b"|".join(_media_bytes(v) for v in value)
    if hasattr(value, "tobytes"):  # a PIL image or a numpy array
        return value.tobytes()
    return repr(value).encode()


def data_fingerprint(samples: Samples) -> str:
    """A digest of ``samples``: the dataset's own fingerprint for an HF ``Dataset``, else
    every sample's question, answer, domain and media."""
    fingerprint = getattr(samples, "_fingerprint", None)
    if fingerprint is not None:
        return f"datasets:{fingerprint}:{len(samples)}"
    sha = hashlib.sha256()
    for sample in samples:
        text = {k: sample.get(k) for k in ("question", "answer", "domain")}
        sha.update(json.dumps(text, sort_keys=True, default=str).encode())
        for key in ("image", "video", "audio"):
            sha.update(_media_bytes(np.asarray(sample[key]) if key == "audio" and sample.get(key) is not None else sample.get(key)))
    return f"samples:{sha.hexdigest()[:16]}:{len(samples)}"
