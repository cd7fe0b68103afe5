"""Evaluation: greedy exact match, answer log-probability, hidden change, cross-domain matrix."""

from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure

from helpers import DOMAINS, make_samples
from mm_lens.analysis.evaluation import METRICS, CrossDomainResult, evaluate_cross_domain, normalize_answer, score_answers
from mm_lens.neurons.neuron_set import NeuronSet


@pytest.fixture(scope="module")
def samples():
    return make_samples(6)


def _greedy_reference(hf_model, processor, sample, max_new_tokens):
    """Token-by-token argmax on an untouched HF model, no cache, one sample at a time."""
    from mm_lens.model.inputs import encode

    inputs = encode(processor, [sample["question"]], [sample["image"]])
    eos, image_token = processor.tokenizer.eos_token_id, hf_model.config.image_token_id
    new = []
    for _ in range(max_new_tokens):
        logits = hf_model(**inputs).logits[0, -1]
        logits[image_token] = -torch.inf
        token = int(logits.argmax())
        if token == eos:
            break
        new.append(token)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def _answer_logprob_reference(hf_model, processor, sample):
    from mm_lens.model.inputs import encode, format_prompt

    n_images = 0 if sample["image"] is None else 1
    prompt = format_prompt(processor, sample["question"], n_images, chat=True)
    inputs = encode(processor, [prompt + " " + sample["answer"]], [sample["image"]], chat=False)
    answer = processor.tokenizer(" " + sample["answer"], add_special_tokens=False)["input_ids"]
    log_probs = hf_model(**inputs).logits[0].log_softmax(-1)
    length = inputs["input_ids"].shape[1]
    return sum(float(log_probs[length - len(answer) - 1 + i, t]) for i, t in enumerate(answer))


def test_normalize_answer_drops_case_punctuation_and_articles():
    assert normalize_answer("  The Red, car. ") == "red car"
    assert normalize_answer("an apple") == normalize_answer("Apple!")


def test_greedy_predictions_equal_token_by_token_argmax(model, hf_reference, samples):
    scores = score_answers(model, samples, batch_size=4, max_new_tokens=3)
    for sample, prediction in zip(samples, scores.predictions):
        assert prediction == _greedy_reference(hf_reference, model.processor, sample, 3)


def test_exact_match_counts_only_matching_answers(model, samples):
    predictions = score_answers(model, samples, max_new_tokens=3).predictions
    relabelled = [dict(s, answer=p if i % 2 == 0 else "zebra") for i, (s, p) in enumerate(zip(samples, predictions))]
    scores = score_answers(model, relabelled, max_new_tokens=3)
    assert scores.correct.tolist() == [i % 2 == 0 for i in range(len(samples))]


def test_answer_logprob_equals_direct_computation(model, hf_reference, samples):
    scores = score_answers(model, samples, batch_size=3, max_new_tokens=1)
    expected = torch.tensor([_answer_logprob_reference(hf_reference, model.processor, s) for s in samples], dtype=torch.float64)
    assert torch.allclose(scores.answer_logprob, expected, atol=1e-4)


def _lm_set(model, chosen):
    """A NeuronSet over the LM MLP: ``chosen`` maps group -> (layer, [neurons])."""
    layers = model.cfg.n_layers
    neurons = {}
    for group, (layer, idx) in chosen.items():
        per_layer = [torch.tensor(idx if l == layer else [], dtype=torch.long) for l in range(layers)]
        neurons[group] = {"lm_mlp": per_layer}
    return NeuronSet(neurons, {"lm_mlp": model.cfg.d_mlp}, {"method": "test"})


def test_cross_domain_matrix_shapes_and_identities(model, samples, tmp_path):
    width = model.cfg.d_mlp
    neuron_set = _lm_set(model, {"noise": (0, list(range(width // 2))), "plain": (1, []), "stripes": (1, list(range(width // 2)))})
    result = evaluate_cross_domain(model, samples, neuron_set, seeds=(0, 1), max_new_tokens=2, progress=False)
    assert result.groups == ["noise", "plain", "stripes"] and result.domains == list(DOMAINS)
    for metric in METRICS:
        assert result.chosen[metric].shape == (3, 3)
        assert result.random[metric].shape == (2, 3, 3)
    # a group with no neuron changes nothing, for itself and for its random control
    assert torch.equal(result.chosen["answer_logprob"][1], result.baseline["answer_logprob"])
    assert torch.equal(result.chosen["hidden_change"][1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(result.random["hidden_change"][:, 1], torch.zeros(2, 3, dtype=torch.float64))
    # switching off half a layer moves the final hidden state
    assert (result.chosen["hidden_change"][2] > 0).all()
    mean, std = result.random_delta("answer_logprob")
    assert mean.shape == std.shape == (3, 3)
    assert "stripes off" in result.table("accuracy")
    assert isinstance(result.plot("answer_logprob"), Figure)
    result.save(tmp_path)
    loaded = CrossDomainResult.load(tmp_path)
    assert loaded.groups == result.groups and all(torch.equal(loaded.chosen[m], result.chosen[m]) for m in METRICS)


def test_missing_answers_or_seeds_are_errors(model, samples):
    neuron_set = _lm_set(model, {"noise": (0, [1])})
    with pytest.raises(ValueError, match="no 'answer' field"):
        evaluate_cross_domain(model, [{k: v for k, v in s.items() if k != "answer"} for s in samples], neuron_set, progress=False)
    with pytest.raises(ValueError, match="at least one seed"):
        evaluate_cross_domain(model, samples, neuron_set, seeds=(), progress=False)


def test_union_row_and_complementary_deactivation(model, samples):
    width = model.cfg.d_mlp
    neuron_set = _lm_set(model, {"noise": (0, [0, 1]), "plain": (1, [2])})
    result = evaluate_cross_domain(model, samples, neuron_set, seeds=(0,), include_union=True, max_new_tokens=1, progress=False)
    assert result.groups == ["noise", "plain", "(all)"]
    everything_but = evaluate_cross_domain(
        model, samples, _lm_set(model, {"noise": (0, list(range(width // 2)))}), seeds=(0,), complementary=True, max_new_tokens=1, progress=False
    )
    # keeping half of layer 0 and switching off the rest, and all of layer 1, moves the answer
    assert (everything_but.chosen["hidden_change"] > 0).all()
    assert everything_but.metadata["complementary"] is True


def test_nan_in_a_layer_is_an_error_naming_the_first_hook_and_the_batch(model, samples):
    layer = model.cfg.n_layers - 1

    def poison(act, hook):
        act[-1] = float("nan")  # the last row of every batch
        return act

    with model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", poison)]):
        with pytest.raises(ValueError, match=rf"batch 0 \(samples 0-2, domains .*\).*blocks\.{layer}\.hook_resid_post \(layer {layer}\)"):
            score_answers(model, samples, batch_size=3, max_new_tokens=1)
        scores = score_answers(model, samples, batch_size=3, max_new_tokens=1, allow_nonfinite=True)
    assert scores.answer_logprob[[2, 5]].isnan().all() and scores.answer_logprob[[0, 1, 3, 4]].isfinite().all()
