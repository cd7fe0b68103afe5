"""HookedMLLM.generate: HF's answers with the media, sampling, stopping, the activations of
every step, and refusals of runs that would drop the media. (Greedy parity with HF's
``generate`` and the cache against a full forward run on all nine architectures in
tests/architectures via ``checks.assert_generation_equals_hf``.)"""

from __future__ import annotations

import pytest
import torch

from mm_lens.model.generation import Generation, StepRecorder, ended_rows


@pytest.fixture(scope="module")
def batch(model, images):
    return model.prepare_inputs(["what is the color", "how many"], [images[0], images[1]])


def media_ids(model) -> list[int]:
    return list(model.spec.token_ids(model.hf_model.config).values())


def test_prompts_with_images_give_the_same_answer_as_their_batch(model, images, batch):
    from_batch = model.generate(batch, max_new_tokens=4)
    from_prompts = model.generate(prompts=["what is the color", "how many"], images=[images[0], images[1]], max_new_tokens=4)
    assert isinstance(from_prompts, Generation)
    assert torch.equal(from_batch.tokens, from_prompts.tokens)
    assert from_batch.text == from_prompts.text
    assert from_batch.text == [t.strip() for t in model.processor.tokenizer.batch_decode(from_batch.new_tokens, skip_special_tokens=True)]


def test_sampling_equals_hf_sampling_with_the_same_seed(model, hf_reference, batch):
    settings = dict(max_new_tokens=6, do_sample=True, temperature=1.7, top_k=50)
    torch.manual_seed(3)
    ours = model.generate(batch, **settings).tokens
    torch.manual_seed(3)
    reference = hf_reference.generate(**batch, **settings, pad_token_id=model.processor.tokenizer.pad_token_id, suppress_tokens=media_ids(model))
    assert torch.equal(ours, reference)
    greedy = model.generate(batch, max_new_tokens=6).tokens
    assert not torch.equal(ours, greedy)  # hot sampling from a random model leaves the greedy path


def test_without_stop_at_eos_every_row_gets_max_new_tokens(model, batch):
    eos = model.processor.tokenizer.eos_token_id
    # make the end of sequence the only choice after the first step: greedy stops there, unless told not to
    def force_eos(logits, hook):
        logits[:, -1, :] = -1e4
        logits[:, -1, eos] = 1e4
        return logits

    with model.hooks(fwd_hooks=[("unembed.hook_out", force_eos)]):
        stopped = model.generate(batch, max_new_tokens=5)
        continued = model.generate(batch, max_new_tokens=5, stop_at_eos=False)
    assert stopped.new_tokens.shape[1] == 1 and (stopped.new_tokens == eos).all()
    assert continued.new_tokens.shape[1] == 5 and (continued.new_tokens == eos).all()
    assert stopped.text == ["", ""]


def test_answer_positions_are_generated_and_after_the_end_padding(model, batch):
    generation = model.generate(batch, max_new_tokens=4, return_cache=True, names_filter="blocks.0.hook_resid_post")
    mm = generation.batch.modality_map
    prompt_length = batch["input_ids"].shape[1]
    assert mm.shape == tuple(generation.tokens.shape)
    assert torch.equal(mm.modality[:, :prompt_length], batch.modality_map.modality)
    ended = ended_rows(generation.new_tokens, [model.processor.tokenizer.eos_token_id])
    assert torch.equal(mm.mask("generated")[:, prompt_length:], ~ended)
    assert torch.equal(generation.batch["attention_mask"][:, prompt_length:].bool(), ~ended)
    assert generation.cache["blocks.0.hook_resid_post"].shape[1] == generation.cache_map.shape[1] == generation.tokens.shape[1] - 1


def test_rows_ended_mark_only_positions_after_the_first_end():
    tokens = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 2], [2, 2, 9, 9]])
    assert ended_rows(tokens, [2]).tolist() == [
        [False, False, True, True], [False, False, False, False], [False, True, True, True]
    ]


def test_cache_assembles_patterns_causally_and_keeps_encoder_hooks(model, batch):
    vision = next(n for n in model.hook_dict if n.startswith("vision_encoder.") and n.endswith("mlp.hook_post"))
    names = ["blocks.1.attn.hook_pattern", "blocks.1.hook_resid_pre", vision]
    generation = model.generate(batch, max_new_tokens=4, stop_at_eos=False, return_cache=True, names_filter=names)
    _, full = model.run_with_cache(generation.batch, names_filter=names)
    n = generation.tokens.shape[1] - 1
    pattern = generation.cache["blocks.1.attn.hook_pattern"]
    assert pattern.shape[-2:] == (n, n)
    queries = (~generation.cache_map.mask("padding"))[:, None, :, None].expand_as(pattern)
    assert pattern.triu(1)[queries].abs().max() == 0  # causal: no key after its query
    assert (pattern - full[names[0]][..., :n, :n]).abs()[queries].max() < 1e-5
    # the encoder ran once, on the prompt (through SDPA in generate, eagerly in run_with_cache)
    assert generation.cache[vision].shape == full[vision].shape
    assert torch.allclose(generation.cache[vision], full[vision], atol=1e-5)


def test_recorder_refuses_a_hook_without_a_position_axis():
    recorder = StepRecorder(["odd"], prompt_length=3)
    recorder.firings["odd"] = [torch.zeros(2, 4), torch.zeros(2, 4)]
    recorder.forwards = 2
    with pytest.raises(ValueError, match="cannot find the position axis of odd"):
        recorder.cache_dict()


def test_generate_refuses_bad_requests(model, images, batch):
    right = model.prepare_inputs(["what is the color", "how many are there here"], [images[0], images[1]], padding_side="right")
    with pytest.raises(ValueError, match="right-padded"):
        model.generate(right)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        model.generate(batch, max_new_tokens=0)
    with pytest.raises(ValueError, match="either a batch"):
        model.generate(batch, prompts=["what"])
    with pytest.raises(KeyError, match="does not have"):
        model.generate(batch, return_cache=True, names_filter=["blocks.0.hook_nothing"])


def test_token_ids_alone_are_refused_instead_of_running_without_the_image(model, batch):
    """TransformerLens' own generate and forward take token ids only: the image would be dropped."""
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        model.bridge.generate(batch["input_ids"], max_new_tokens=2, verbose=False)
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        model.bridge(batch["input_ids"])
    text_only = model.processor.tokenizer(["what is the color"], return_tensors="pt")["input_ids"]
    assert model.bridge(text_only).shape[:2] == text_only.shape  # text without media placeholders still runs


def test_the_canary_passes_working_generation_and_stops_broken_generation(model, batch, monkeypatch):
    from mm_lens.model.architectures.bridge_components import _CacheKeywordAttention
    from mm_lens.model.generation_check import check_generation, greedy_without_cache

    check_generation(model, batch, max_new_tokens=4)
    assert torch.equal(greedy_without_cache(model, batch, 4), model.generate(batch, max_new_tokens=4).new_tokens)
    # the transformers 5.24 failure: decoding steps that never see the cached keys, on
    # TransformerLens' eager attention (generate's path whenever a hook needs the pattern, or
    # with use_sdpa off; the SDPA path leaves the cache to HF's module)
    monkeypatch.setattr(model, "use_sdpa", False)
    monkeypatch.setattr(_CacheKeywordAttention, "_update_kv_cache", lambda self, k, v, **kwargs: (k, v))
    with pytest.raises(RuntimeError, match="disagrees with full forwards"):
        check_generation(model, batch, max_new_tokens=4)


def test_neuron_statistics_over_generated_answers_equal_a_full_forward(model, batch):
    """MMNeuron's counts on the answers a model generated: from the generation's own cache,
    and from a plain forward of the same positions."""
    from mm_lens.neurons.statistics import NeuronStatsCollector

    generation = model.generate(batch, max_new_tokens=4, stop_at_eos=False, return_cache=True,
                                names_filter=lambda name: name.endswith("mlp.hook_act"))
    domains = ["a", "b"]
    from_generation = NeuronStatsCollector(model, domains, classes=("generated", "all"), modules=["lm_mlp"])
    from_generation.add_cache(generation.cache, generation.cache_batch, domains)
    from_forward = NeuronStatsCollector(model, domains, classes=("generated", "all"), modules=["lm_mlp"])
    from_forward.update(generation.cache_batch, domains)
    ours, reference = from_generation.stats.modules["lm_mlp"], from_forward.stats.modules["lm_mlp"]
    assert ours.n_tokens[0, :, 0].tolist() == [3, 3]  # four answer tokens, the last never fed back
    assert torch.equal(ours.n_tokens, reference.n_tokens) and torch.equal(ours.over_zero, reference.over_zero)
    assert torch.allclose(ours.sum, reference.sum, atol=1e-4)


def test_sampling_defaults_are_hf_defaults(model, hf_reference, batch):
    """Unset top_k/top_p keep the model's generation config (HF samples with top_k=50)."""
    torch.manual_seed(5)
    ours = model.generate(batch, max_new_tokens=6, do_sample=True, temperature=1.5).tokens
    torch.manual_seed(5)
    reference = hf_reference.generate(**batch, max_new_tokens=6, do_sample=True, temperature=1.5,
                                      pad_token_id=model.processor.tokenizer.pad_token_id, suppress_tokens=media_ids(model))
    assert torch.equal(ours, reference)


def test_logit_lens_reads_the_generated_answer(model, batch):
    """The lens on a generation's answer positions: at the last layer, the model's own log-probs there."""
    from mm_lens import logit_lens

    generation = model.generate(batch, max_new_tokens=4, stop_at_eos=False)
    lens = logit_lens(model, generation.batch, positions="generated", layers=[model.cfg.n_layers - 1], k=1)
    mm = generation.batch.modality_map
    assert len(lens.rows) == int(mm.mask("generated").sum()) == 2 * 4
    log_probs = model(generation.batch).log_softmax(-1)[lens.rows, lens.positions]
    assert torch.allclose(lens["resid_post"].top_probs[0, :, 0].log(), log_probs.max(-1).values, atol=1e-4)
