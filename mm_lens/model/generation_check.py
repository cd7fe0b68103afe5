"""The generation canary: ``model.generate`` (KV cache, HF's ``generate``) against an
independent greedy loop of full forwards, for pipelines that evaluate by generation."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from mm_lens.model.generation import sequence_batch
from mm_lens.model.hooked import HookedMLLM
from mm_lens.model.inputs import MultimodalBatch


def greedy_without_cache(model: HookedMLLM, batch: MultimodalBatch, max_new_tokens: int) -> Int[Tensor, "batch new"]:
    """Greedy answers by full forwards of the growing sequence (no KV cache, no HF
    ``generate``): the independent reference ``check_generation`` compares with. Media
    placeholder tokens are never chosen, as in ``HookedMLLM.generate``; rows stop together
    at ``max_new_tokens`` or when every row has ended (later tokens of an ended row are pad)."""
    tokenizer = model.processor.tokenizer
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    media = list(model.spec.token_ids(model.hf_model.config).values())
    derive = None if model.spec.derived_inputs is None else (lambda inputs: model.spec.derived_inputs(model.hf_model.config, inputs))
    new = torch.zeros(batch["input_ids"].shape[0], 0, dtype=torch.long, device=batch["input_ids"].device)
    for _ in range(max_new_tokens):
        # HF feeds an ended row its pad tokens with attention: so does this loop
        running = sequence_batch(batch, new, torch.zeros_like(new, dtype=torch.bool), derive)
        logits = model(running)[:, -1].float()
        logits[:, media] = -torch.inf
        finished = (new == eos).any(dim=1)
        chosen = torch.where(finished, pad, logits.argmax(-1))
        new = torch.cat([new, chosen[:, None]], dim=1)
        if bool((finished | (chosen == eos)).all()):
            break
    return new


def check_generation(model: HookedMLLM, batch: MultimodalBatch, max_new_tokens: int) -> None:
    """The canary of pipelines that evaluate by generation: ``model.generate`` (KV cache)
    must give the answers of ``greedy_without_cache`` on ``batch``; raises ``RuntimeError``
    saying so otherwise, instead of scoring every sample with broken generation."""
    with torch.no_grad():
        cached = model.generate(batch, max_new_tokens=max_new_tokens).new_tokens
        reference = greedy_without_cache(model, batch, max_new_tokens)
    if not torch.equal(cached, reference):
        decode = model.processor.tokenizer.batch_decode
        raise RuntimeError(
            f"generation with the KV cache disagrees with full forwards on the first samples: {decode(cached)} vs "
            f"{decode(reference)}; the installed transformers/transformer-lens are probably outside the tested range "
            "(see the warning at import); install a tested version"
        )
