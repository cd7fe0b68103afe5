"""Checks every architecture's tests run: the foundation's (logits equal HF's, every hook
fires, features sit where the ModalityMap says, neuron zeroing equals a plain PyTorch hook
on HF's module) and one run of each analysis with a property that must hold.

Architecture test modules call them with their own batches and with references computed
by the untouched HF model, never by mm_lens.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from helpers import hf_logits_with_act_zeroed
from mm_lens.neurons.collection import collect_neuron_stats
from mm_lens.model.samples import prompt_batch, sample_chunks
from mm_lens.neurons.deactivation import deactivated
from mm_lens.neurons.domain_neurons import select_domain_neurons
from mm_lens.analysis.lens import logit_lens
from mm_lens.neurons.modality_neurons import collect_miner_scores, select_modality_neurons
from mm_lens.analysis.patching import patch_sweep


def mixed_image_batch(model: Any, pictures: Sequence[Any], padding_side: str = "left") -> Any:
    """Three rows: ``pictures[0]``; ``pictures[1]`` and ``pictures[2]`` sharing a prompt; no image."""
    return model.prepare_inputs(
        ["what is the color", "how many", "is there a car"],
        [pictures[0], [pictures[1], pictures[2]], None],
        padding_side=padding_side,
    )


def chat_text(processor: Any, n_images: int, text: str = "what") -> str:
    """One prompt with ``n_images`` images through the chat template, as ``prepare_inputs`` writes it."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def assert_logits_equal_hf(model: Any, hf_reference: Any, batch: Any, atol: float = 1e-5) -> None:
    """Logits of every non-padding position equal the untouched HF model's."""
    ours = model(batch)
    reference = hf_reference(**batch).logits
    assert ours.shape == (*batch["input_ids"].shape, model.cfg.d_vocab)
    mask = batch["attention_mask"].bool()
    assert (ours - reference)[mask].abs().max() <= atol


def assert_every_hook_fires(model: Any, cache: Any) -> None:
    """Every hook of ``hook_dict`` is in ``cache`` unless TL gates it or the spec lists it inert."""
    silent = {name for name in model.hook_dict if name not in cache.keys()}
    explained = {n for n in silent if model.bridge._gated_hook_reason(n) is not None or n.endswith(model.spec.inert_hooks)}
    assert silent == explained, f"hooks that never fired: {sorted(silent - explained)}"


def assert_neuron_hooks(model: Any, cache: Any, layers: Mapping[str, int]) -> None:
    """``layers``: neuron module -> number of hooks it must have. Each hook fired and its
    last axis is the module's width."""
    hooks = model.neuron_hooks
    assert {m: len(h) for m, h in hooks.items()} == dict(layers)
    for module, names in hooks.items():
        for name in names:
            assert cache[name].shape[-1] == model.neuron_widths[module], name


def hf_module_outputs(hf_model: Any, module: torch.nn.Module, batch: Any) -> list[Any]:
    """The outputs of one module of an untouched HF model during its forward on ``batch``
    (one per call), caught by a plain PyTorch forward hook: an independent reference."""
    outputs: list[Any] = []
    handle = module.register_forward_hook(lambda _module, _args, out: outputs.append(out))
    try:
        hf_model(**batch)
    finally:
        handle.remove()
    return outputs


def assert_features_at_positions(
    batch: Any, embeddings: Tensor, features: Mapping[str, Tensor], all_placed: bool = True
) -> None:
    """``embeddings``: the LM's input ``[batch, pos, d]``; ``features[modality]``: HF's
    projected features ``[n, d]`` of that modality, items in HF's order. Every position the
    map gives a feature row holds exactly that row, no row twice, and (``all_placed``)
    every row somewhere (LLaVA-NeXT drops the rows its unpadding cuts)."""
    mm = batch.modality_map
    for modality, rows in features.items():
        placed = mm.mask(modality) & (mm.feature >= 0)
        used = mm.feature[placed]
        torch.testing.assert_close(embeddings[placed], rows[used], atol=1e-6, rtol=0)
        assert used.unique().numel() == used.numel(), modality
        if all_placed:
            assert used.numel() == rows.shape[0], modality


def assert_zeroing_matches_hf_hook(model: Any, hf_reference: Any, batch: Any, channels: Sequence[int] = (0, 3, 5)) -> None:
    """Zeroing ``blocks.{last}.mlp.hook_act`` channels equals HF with ``act_fn`` zeroed by a
    PyTorch forward hook, and changes the logits."""
    layer = model.cfg.n_layers - 1

    def zero(act: Tensor, hook: Any) -> Tensor:
        act[..., list(channels)] = 0.0
        return act

    ours = model.run_with_hooks(batch, fwd_hooks=[(f"blocks.{layer}.mlp.hook_act", zero)])
    reference = hf_logits_with_act_zeroed(hf_reference, batch, layer, list(channels))
    mask = batch["attention_mask"].bool()
    assert (ours - reference)[mask].abs().max() <= 1e-5
    assert (ours - model(batch))[mask].abs().max() > 1e-6


RealRows = Callable[[Any], Mapping[str, Tensor]]


def hf_answer_logprob(
    hf_model: Any, processor: Any, messages_content: list[dict], answer: str, media: Mapping[str, Any],
    prompt_only: Sequence[str] = (),
) -> float:
    """Reference for teacher-forced scoring, straight from HF: one sample, no padding. The
    chat prompt from the processor's template (``messages_content``: the user turn's
    entries), the answer appended, the answer tokens' log-probabilities summed; inputs named
    in ``prompt_only`` come from the prompt alone."""
    prompt = processor.apply_chat_template([{"role": "user", "content": messages_content}], add_generation_prompt=True)
    full = processor(text=[prompt + " " + answer], return_tensors="pt", **media)
    if prompt_only:
        alone = processor(text=[prompt], return_tensors="pt", **media)
        full.update({name: alone[name] for name in prompt_only})
    tokenizer = processor.tokenizer
    n = len(tokenizer(prompt + " " + answer, add_special_tokens=False)["input_ids"]) - len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = full["input_ids"][0]
    log_probs = hf_model(**full).logits[0].log_softmax(-1)
    return float(log_probs[-n - 1 : -1].gather(-1, ids[-n:, None]).sum())


def _cached_totals(
    model: Any, samples: Sequence[dict], batch_size: int, real_rows: RealRows | None
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per neuron hook: (activations > 0 per neuron, rows) over every sample, straight from
    ``run_with_cache`` (language-model hooks read at non-padding positions; encoder hooks
    whole, or where ``real_rows(batch)[module]`` ``[units, rows]`` is True)."""
    totals: dict[str, tuple[Tensor, Tensor]] = {}
    names = [name for hooks in model.neuron_hooks.values() for name in hooks]
    module_of = {name: module for module, hooks in model.neuron_hooks.items() for name in hooks}
    for _, chunk in sample_chunks(samples, batch_size):
        batch = prompt_batch(model, chunk)
        with model.fast_attention():  # the statistics' attention path: counts agree to the bit
            _, cache = model.run_with_cache(batch, names_filter=names)
        masks = {} if real_rows is None else real_rows(batch)
        for name in names:
            if name not in cache.keys():
                continue
            act = cache[name]
            if name.startswith("blocks."):
                rows = act[batch["attention_mask"].bool()]
            elif module_of[name] in masks:
                mask = masks[module_of[name]]
                rows = act.reshape(*mask.shape, act.shape[-1])[mask]
            else:
                rows = act.reshape(-1, act.shape[-1])
            fired, count = (rows > 0).sum(0), torch.tensor(rows.shape[0])
            previous = totals.get(name, (0, 0))
            totals[name] = (previous[0] + fired, previous[1] + count)
    return totals


def assert_analyses_run(
    model: Any, samples: Sequence[dict], clean: Any, corrupted: Any, media: str = "image", real_rows: RealRows | None = None
) -> None:
    """One run of each analysis on ``samples`` (dicts with question, domain, answer and an
    ``image`` or ``audio``) and a clean/corrupted pair differing in their media:

    - statistics: firing counts and position counts summed over domains equal a plain
      ``run_with_cache`` count, for every neuron hook (LM and encoder; ``real_rows(batch)``
      gives, for encoder modules that run on padding, the ``[units, rows]`` real rows), and
      positions (and, up to one rounding-level sign flip, firing counts) per domain and class
      equal those of one-sample batches, where the split between rows is trivially right;
    - domain selection (LAPE) gives valid indices, and deactivating them runs;
    - MINER scores are finite and LA_MU selects ``int(ratio * L * N) // 2`` LM neurons per modality;
    - logit lens after the last layer equals the model's own log-probabilities;
    - patching: clean->clean is 1, corrupted->corrupted is 0.
    """
    classes = (media, "text", "all", "last")
    stats = collect_neuron_stats(model, samples, batch_size=2, classes=classes, progress=False)
    hooks = model.neuron_hooks
    for name, (fired, rows) in _cached_totals(model, samples, 2, real_rows).items():
        module = next(m for m, names in hooks.items() if name in names)
        layer = hooks[module].index(name)
        assert torch.equal(stats.over_zero(module, "all")[layer].sum(-1), fired.long()), name
        assert int(stats.n_tokens(module, "all").sum()) == int(rows), name
    assert all(int(stats.n_tokens(module, media).sum()) > 0 for module in stats.modules)
    one_by_one = collect_neuron_stats(model, samples, batch_size=1, classes=classes, progress=False)
    for module in stats.modules:
        for position_class in classes:
            assert torch.equal(stats.n_tokens(module, position_class), one_by_one.n_tokens(module, position_class)), (module, position_class)
            batched, alone = stats.over_zero(module, position_class), one_by_one.over_zero(module, position_class)
            assert (batched - alone).abs().max() <= 1, (module, position_class)  # a sign flip at rounding level at most

    neurons = select_domain_neurons(stats)
    for module, per_layer in neurons.union().items():
        assert len(per_layer) == len(hooks[module])
        assert all(((i >= 0) & (i < model.neuron_widths[module])).all() for i in per_layer)
    with deactivated(model, neurons):
        assert torch.isfinite(model(clean)).all()

    scores = collect_miner_scores(model, {"all": samples}, modalities=("text", media), batch_size=2, progress=False)
    assert torch.isfinite(scores.scores).all()
    chosen = select_modality_neurons(scores, ratio=0.05)
    n_neurons = model.cfg.n_layers * model.neuron_widths["lm_mlp"]
    for modality in ("text", media):
        assert sum(len(i) for i in chosen.union([modality])["lm_mlp"]) == int(0.05 * n_neurons) // 2

    last = model.cfg.n_layers - 1
    lens = logit_lens(model, clean, positions="last", layers=[last], k=3)
    logprobs = model(clean)[lens.rows, lens.positions].log_softmax(-1)
    torch.testing.assert_close(lens.top_probs[0], logprobs.topk(3).values.exp(), atol=1e-5, rtol=0)

    ones = patch_sweep(model, clean, corrupted, source="clean", target="clean", positions=media, per="all", progress=False)
    zeros = patch_sweep(model, clean, corrupted, source="corrupted", target="corrupted", positions="text", progress=False)
    assert torch.allclose(ones.effect, torch.ones_like(ones.effect), atol=1e-4)
    assert torch.allclose(zeros.effect, torch.zeros_like(zeros.effect), atol=1e-4)
    # the fast sweep (each patch resumed at its layer, and from its first position where the
    # KV cache allows) equals one full forward per patch
    fast = patch_sweep(model, clean, corrupted, positions=media, metric="kl", patches_per_forward=3, progress=False)
    plain = patch_sweep(model, clean, corrupted, positions=media, metric="kl", fast=False, progress=False)
    assert torch.allclose(fast.metric, plain.metric, atol=1e-5), float((fast.metric - plain.metric).abs().max())


def assert_generation_equals_hf(model: Any, hf_reference: Any, batch: Any, max_new_tokens: int = 5) -> None:
    """Greedy ``model.generate`` (KV cache on) equals HF's ``generate`` on the untouched
    model, also inside a hooks context; its cache equals a full forward over the generated
    sequence at every non-padding position it covers."""
    pad = model.processor.tokenizer.pad_token_id
    media = list(model.spec.token_ids(model.hf_model.config).values())  # mm_lens never generates a placeholder
    reference = hf_reference.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, suppress_tokens=media)
    names = [f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", "blocks.0.mlp.hook_act", "blocks.0.attn.hook_pattern"]
    generation = model.generate(batch, max_new_tokens=max_new_tokens, return_cache=True, names_filter=names)
    assert torch.equal(generation.tokens, reference)
    assert generation.new_tokens.shape[1] > 1  # several decoding steps over the KV cache
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda act, hook: act.clone())]):
        assert torch.equal(model.generate(batch, max_new_tokens=max_new_tokens).tokens, reference)
    _, full = model.run_with_cache(generation.batch, names_filter=names)
    cached = generation.cache_map
    keep = ~cached.mask("padding")
    n = cached.shape[1]
    assert n == reference.shape[1] - 1
    for name in names[:2]:
        assert (generation.cache[name] - full[name][:, :n])[keep].abs().max() <= 1e-4, name
    pattern, full_pattern = generation.cache[names[2]], full[names[2]][:, :, :n, :n]
    keys = keep[:, None, None, :] & keep[:, None, :, None]
    assert (pattern - full_pattern).abs().masked_select(keys).max() <= 1e-4
