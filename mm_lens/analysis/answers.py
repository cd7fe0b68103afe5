"""Scoring a model's answers, with or without neurons switched off.

From one teacher-forced forward of prompt + answer: the answer's log-probability (sum over its
tokens), its **margin** over the best other answer of its closed answer set, whether the first
answer token is the model's top choice (first-token accuracy), and the final residual at the
last prompt position. Optionally also greedy decoding with exact match (the published MMNeuron
code sampled at temperature 0.9; we decode greedily).

An answer set is the distinct answers of the samples with the same ``domain`` and
``question_type`` (the domain alone without one), or a sample's own ``choices`` list.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.base.hooks import block_hook
from mm_lens.model.hooked import HookedMLLM
from mm_lens.model.inputs import answer_token_ids
from mm_lens.model.samples import Sample, Samples, chat_prompt, chunk_media, prompt_batch, sample_chunks, sample_column
from mm_lens.neurons.deactivation import Deactivation

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """VQA-style normal form: lower case, no punctuation or articles, single spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


@dataclass
class AnswerScores:
    """Per-sample results of one scoring run. ``correct`` (greedy exact match) and
    ``predictions`` are ``None`` when the run did not decode."""

    answer_logprob: Float[Tensor, "sample"]
    margin: Float[Tensor, "sample"]  # NaN where the answer set has no other answer
    first_token_correct: Bool[Tensor, "sample"]
    final_hidden: Float[Tensor, "sample d_model"]
    correct: Bool[Tensor, "sample"] | None = None
    predictions: list[str] | None = None


def answers_of(samples: Samples) -> list[str]:
    """The samples' answers, each checked to be a non-empty string."""
    answers = sample_column(samples, "answer")
    for i, answer in enumerate(answers):
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"sample {i} has the answer {answer!r}: answers must be non-empty strings")
    return answers


def _question_type(row: Sample) -> tuple[Any, Any]:
    """The key answer sets are shared under: (domain, question type)."""
    return row.get("domain"), row.get("question_type")


def _shared_answers(rows: Sequence[Sample], answers: Sequence[str]) -> dict[Any, list[str]]:
    """Per ``_question_type``, the distinct answers (first-seen order) of the rows without
    their own ``choices``."""
    shared: dict[Any, list[str]] = defaultdict(list)
    for row, answer in zip(rows, answers):
        if row.get("choices") is None and answer not in shared[_question_type(row)]:
            shared[_question_type(row)].append(answer)
    return shared


def answer_sets(samples: Samples) -> list[list[str]]:
    """Each sample's closed answer set (its own answer first): its ``choices`` if it has
    them, else the distinct answers of the samples (without ``choices``) sharing its domain
    and question type."""
    answers = answers_of(samples)
    rows = [samples[i] for i in range(len(samples))]
    shared = _shared_answers(rows, answers)
    sets = []
    for row, answer in zip(rows, answers):
        choices = list(row["choices"]) if row.get("choices") is not None else shared[_question_type(row)]
        if answer not in choices:
            raise ValueError(f"the answer {answer!r} is not among the sample's choices {choices}")
        sets.append([answer] + [c for c in choices if c != answer])
    return sets


def with_choices(chosen: Samples, among: Samples, most: int = 32) -> list[Sample]:
    """``chosen`` (e.g. a few samples per domain) with each sample's closed answer set from
    ``among`` (the dataset it was drawn from) stored as ``choices``, so that margins of a
    small subset still compare each answer with every answer its question type has, not
    only those that happen to be in the subset. Samples with their own ``choices`` keep
    them; a question type with more than ``most`` distinct answers is open-ended (and each
    multi-token answer would cost a forward), so its samples are left as they are."""
    pool = [among[i] for i in range(len(among))]
    shared = _shared_answers(pool, answers_of(pool))
    out = []
    for row in (chosen[i] for i in range(len(chosen))):
        key = _question_type(row)
        if row.get("choices") is not None or key not in shared or len(shared[key]) > most:
            out.append(dict(row))
            continue
        choices = shared[key] if row.get("answer") in shared[key] else [*shared[key], row.get("answer")]
        out.append(dict(row, choices=list(choices)))
    return out


def _forward(model: HookedMLLM, chunk: Sequence[Sample], answers: Sequence[str], deactivate: Deactivation | None):
    """One left-padded forward of each prompt + its answer in ``answers``: log-probs, the
    batch, the answers' token counts and the saved final residual. Inputs derived from the
    prompt alone (``spec.prompt_only_inputs``, e.g. InstructBLIP's Q-Former instruction) come
    from the prompt without the answer."""
    media = chunk_media(chunk)
    prompts = [chat_prompt(model, s) for s in chunk]
    batch = model.prepare_inputs([p + " " + a for p, a in zip(prompts, answers)], **media, chat=False)
    if model.spec.prompt_only_inputs:
        question_only = model.prepare_inputs(prompts, **media, chat=False)
        batch.inputs.update({name: question_only[name] for name in model.spec.prompt_only_inputs})
    lengths = [len(answer_token_ids(model.processor, p, a)) for p, a in zip(prompts, answers)]
    saved: dict[str, Tensor] = {}

    def save_final(resid: Tensor, hook: Any) -> None:
        saved["resid"] = resid.detach()

    hooks = _hooks(model, batch, deactivate) + [(block_hook(model.cfg.n_layers - 1, "resid_post"), save_final)]
    with torch.no_grad():
        log_probs = model.run_with_hooks(batch, fwd_hooks=hooks).log_softmax(-1)
    return log_probs, batch, lengths, saved["resid"], hooks


def _sequence_logprob(log_probs: Tensor, ids: Tensor, lengths: Sequence[int]) -> Float[Tensor, "sample"]:
    end = ids.shape[1]
    return torch.stack([
        log_probs[row, end - n - 1 : end - 1].gather(-1, ids[row, end - n :, None]).sum() for row, n in enumerate(lengths)
    ])


def _first_nonfinite(model: HookedMLLM, batch: Any, hooks: list) -> str:
    """The first residual-stream hook (embedding, then each block's output) holding NaN or
    inf at a real (unpadded) position of ``batch``, rerun with the same ``hooks``."""
    names = ["hook_embed"] + [block_hook(layer, "resid_post") for layer in range(model.cfg.n_layers)]
    keep = batch["attention_mask"].bool()
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(batch, names_filter=lambda name: name in names)
    for name in names:
        if name in cache and not bool(torch.isfinite(cache[name][keep.to(cache[name].device)]).all()):
            return name if name == "hook_embed" else f"{name} (layer {name.split('.')[1]})"
    return "the logits only (every residual hook is finite)"


def _teacher_forced(
    model: HookedMLLM, chunk: Sequence[Sample], sets: Sequence[list[str]], deactivate: Deactivation | None,
    where: str, allow_nonfinite: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Answer log-prob, margin, first-token hit and final residual at the last prompt
    position for one chunk. Where every answer of a set is one token, the other answers'
    log-probs are read off the same forward (the prompt is the same prefix); otherwise each
    other answer gets a forward of its own."""
    log_probs, batch, lengths, resid, hooks = _forward(model, chunk, [s[0] for s in sets], deactivate)
    if not allow_nonfinite and not bool(torch.isfinite(log_probs[batch["attention_mask"].bool()]).all()):
        raise ValueError(
            f"NaN or inf in the answer scores of {where}: first seen at {_first_nonfinite(model, batch, hooks)}. "
            "Check the model, its dtype and the inputs (and the deactivation's replacement values), or pass allow_nonfinite=True"
        )
    ids, end = batch["input_ids"], batch["input_ids"].shape[1]
    logprob = _sequence_logprob(log_probs, ids, lengths)
    first = torch.stack([log_probs[row, end - n - 1] for row, n in enumerate(lengths)])  # [sample, vocab]
    first_hit = first.argmax(-1) == torch.stack([ids[row, end - n] for row, n in enumerate(lengths)])
    hidden = torch.stack([resid[row, end - n - 1] for row, n in enumerate(lengths)])
    prompts = [chat_prompt(model, s) for s in chunk]
    others = torch.full((len(chunk),), float("-inf"), dtype=log_probs.dtype)
    single = [[answer_token_ids(model.processor, p, c) for c in s] for p, s in zip(prompts, sets)]
    if all(len(t) == 1 for tokens in single for t in tokens):
        for row, tokens in enumerate(single):
            if len(tokens) > 1:
                others[row] = first[row, [t[0] for t in tokens[1:]]].max()
    else:
        for slot in range(1, max(len(s) for s in sets)):
            rows = [row for row, s in enumerate(sets) if len(s) > slot]
            sub_probs, sub_batch, sub_lengths, _, _ = _forward(model, [chunk[r] for r in rows], [sets[r][slot] for r in rows], deactivate)
            values = _sequence_logprob(sub_probs, sub_batch["input_ids"], sub_lengths)
            others[rows] = torch.maximum(others[rows], values.to(others))
    margin = torch.where(torch.isinf(others), torch.nan, logprob - others)
    return logprob, margin, first_hit, hidden


def _hooks(model: HookedMLLM, batch: Any, deactivate: Deactivation | None) -> list:
    return [] if deactivate is None else deactivate.hooks(model, batch.modality_map)


def _greedy_answers(model: HookedMLLM, batch: Any, hooks: list, max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt (``model.generate`` with the hooks active)."""
    with model.hooks(fwd_hooks=hooks):
        return model.generate(batch, max_new_tokens=max_new_tokens).text


def score_answers(
    model: HookedMLLM,
    samples: Samples,
    *,
    deactivate: Deactivation | None = None,
    greedy: bool = True,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> AnswerScores:
    """Teacher-forced answer log-prob, margin over the answer set (``answer_sets``) and
    first-token accuracy, the last layer's residual at the last prompt position, and with
    ``greedy`` the greedy answers and their exact match.

    ``deactivate``: a ``Deactivation`` (neurons, mode, positions, ...); its hooks are rebuilt
    per batch with that batch's ModalityMap. NaN or inf in the scores is an error naming the
    hook and batch unless ``allow_nonfinite``.
    """
    sets = answer_sets(samples)  # every sample needs its answer, checked before any batch runs
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; pass at least 1")
    parts: dict[str, list[Tensor]] = defaultdict(list)
    correct, predictions = [], []
    chunks = list(sample_chunks(samples, batch_size))
    for number, (start, chunk) in enumerate(tqdm(chunks, desc="answers", disable=not progress, unit="batch")):
        if greedy:
            prompt = prompt_batch(model, chunk)
            answers = _greedy_answers(model, prompt, _hooks(model, prompt, deactivate), max_new_tokens)
            predictions += answers
            correct += [normalize_answer(a) == normalize_answer(s["answer"]) for a, s in zip(answers, chunk)]
        domains = ", ".join(sorted({str(s.get("domain", "?")) for s in chunk}))
        where = f"batch {number} (samples {start}-{start + len(chunk) - 1}, domains {domains})"
        values = _teacher_forced(model, chunk, sets[start : start + len(chunk)], deactivate, where, allow_nonfinite)
        for name, value in zip(("logprob", "margin", "first", "hidden"), values):
            parts[name].append(value)
    return AnswerScores(
        answer_logprob=torch.cat(parts["logprob"]).double().cpu(),
        margin=torch.cat(parts["margin"]).double().cpu(),
        first_token_correct=torch.cat(parts["first"]).cpu(),
        final_hidden=torch.cat(parts["hidden"]).double().cpu(),
        correct=torch.tensor(correct, dtype=torch.bool) if greedy else None,
        predictions=predictions if greedy else None,
    )
