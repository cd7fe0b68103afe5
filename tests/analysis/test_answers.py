"""Answer scoring: greedy exact match, teacher-forced log-probability, margin over the answer
set and first-token accuracy, each against a direct computation on the untouched HF model."""

from __future__ import annotations

import pytest
import torch

from helpers import make_samples
from mm_lens.analysis.answers import answer_sets, normalize_answer, score_answers, with_choices


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


def _answer_inputs(processor, sample):
    """HF inputs of the chat prompt followed by the answer, and the answer's token ids."""
    from mm_lens.model.inputs import encode, format_prompt

    prompt = format_prompt(processor, sample["question"], 0 if sample["image"] is None else 1, chat=True)
    inputs = encode(processor, [prompt + " " + sample["answer"]], [sample["image"]], chat=False)
    return inputs, processor.tokenizer(" " + sample["answer"], add_special_tokens=False)["input_ids"]


def _answer_logprob_reference(hf_model, processor, sample):
    inputs, answer = _answer_inputs(processor, sample)
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
    kept = [i % 2 == 0 and bool(p.strip()) for i, p in enumerate(predictions)]  # an answer is never empty
    relabelled = [dict(s, answer=p if keep else "zebra") for s, p, keep in zip(samples, predictions, kept)]
    scores = score_answers(model, relabelled, max_new_tokens=3)
    assert scores.correct.tolist() == kept


def test_answer_logprob_equals_direct_computation(model, hf_reference, samples):
    scores = score_answers(model, samples, batch_size=3, max_new_tokens=1)
    expected = torch.tensor([_answer_logprob_reference(hf_reference, model.processor, s) for s in samples], dtype=torch.float64)
    assert torch.allclose(scores.answer_logprob, expected, atol=1e-4)


def _first_answer_position_reference(hf_model, processor, sample):
    """HF log-probs over the vocabulary where the answer's first token is predicted."""
    inputs, answer = _answer_inputs(processor, sample)
    return hf_model(**inputs).logits[0, inputs["input_ids"].shape[1] - len(answer) - 1].log_softmax(-1), answer[0]


def test_answer_sets_group_by_domain_and_question_type_or_take_choices():
    rows = [
        {"answer": "red", "domain": "a", "question_type": "color"},
        {"answer": "blue", "domain": "a", "question_type": "color"},
        {"answer": "two", "domain": "a", "question_type": "count"},
        {"answer": "red", "domain": "b"},
        {"answer": "yes", "domain": "b", "choices": ["no", "yes", "maybe"]},
    ]
    assert answer_sets(rows) == [["red", "blue"], ["blue", "red"], ["two"], ["red"], ["yes", "no", "maybe"]]
    with pytest.raises(ValueError, match="'yes' is not among the sample's choices"):
        answer_sets([{"answer": "yes", "domain": "b", "choices": ["no"]}])
    with pytest.raises(ValueError, match="sample 1 has the answer ' ': answers must be non-empty strings"):
        answer_sets([{"answer": "yes", "domain": "b"}, {"answer": " ", "domain": "b"}])


def test_with_choices_gives_a_subset_the_answer_sets_of_its_whole_dataset():
    whole = [
        {"answer": "red", "domain": "a", "question_type": "color"},
        {"answer": "blue", "domain": "a", "question_type": "color"},
        {"answer": "green", "domain": "a", "question_type": "color"},
        {"answer": "two", "domain": "a", "question_type": "count"},
        {"answer": "yes", "domain": "b", "choices": ["no", "yes"]},
    ]
    subset = [whole[0], whole[3], whole[4], {"answer": "pink", "domain": "a", "question_type": "color"}]
    assert answer_sets(subset) == [["red", "pink"], ["two"], ["yes", "no"], ["pink", "red"]]  # the subset alone
    given = with_choices(subset, whole)
    assert answer_sets(given) == [["red", "blue", "green"], ["two"], ["yes", "no"], ["pink", "red", "blue", "green"]]
    assert "choices" not in subset[0]  # the caller's samples are left as they were
    assert answer_sets(with_choices(subset, whole, most=2)) == answer_sets(subset)  # open-ended types are left alone


@pytest.mark.parametrize("choices", [["red", "two", "no"], ["a road", "red", "no"]], ids=["one-token answers", "longer answers"])
def test_margin_is_the_answer_log_prob_minus_the_best_other_choice(model, hf_reference, samples, choices):
    rows = [dict(s, answer=choices[i % len(choices)], choices=choices) for i, s in enumerate(samples)]
    scores = score_answers(model, rows, batch_size=4, greedy=False)
    for row, margin in zip(rows, scores.margin.tolist()):
        value = {c: _answer_logprob_reference(hf_reference, model.processor, dict(row, answer=c)) for c in choices}
        assert margin == pytest.approx(value[row["answer"]] - max(v for c, v in value.items() if c != row["answer"]), abs=1e-4)
    assert scores.correct is None and scores.predictions is None


def test_margin_is_nan_where_the_answer_set_has_no_other_answer(model, samples):
    scores = score_answers(model, [dict(s, choices=[s["answer"]]) for s in samples], greedy=False)
    assert scores.margin.isnan().all() and scores.answer_logprob.isfinite().all()


def test_first_token_accuracy_is_the_argmax_at_the_first_answer_position(model, hf_reference, samples):
    log_probs = [_first_answer_position_reference(hf_reference, model.processor, s) for s in samples]
    relabelled = [dict(s, answer=model.processor.tokenizer.decode([int(lp.argmax())]).strip() if i % 2 else s["answer"])
                  for i, (s, (lp, _)) in enumerate(zip(samples, log_probs))]
    scores = score_answers(model, relabelled, greedy=False)
    expected = [int(lp.argmax()) == first for lp, first in
                (_first_answer_position_reference(hf_reference, model.processor, s) for s in relabelled)]
    assert scores.first_token_correct.tolist() == expected and any(expected)


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
