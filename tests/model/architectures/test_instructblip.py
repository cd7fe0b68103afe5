"""InstructBLIP: logits equal HF's (one image per prompt, images of different sizes, both
paddings), every hook fires with its documented shape, the neuron hooks are HF's own
activations (vision MLP, Q-Former feed-forwards of queries and instruction, LM MLP), the
query features sit where the ModalityMap says, bad inputs (text-only rows included) fail
clearly, and every analysis runs."""

from __future__ import annotations

import pytest
import torch
from checks import (
    hf_answer_logprob,
    assert_analyses_run,
    assert_every_hook_fires,
    assert_features_at_positions,
    assert_logits_equal_hf,
    assert_neuron_hooks,
    assert_zeroing_matches_hf_hook,
    hf_module_outputs,
)
from helpers import VARIED_SIZES, make_samples, random_image
from transformers import (
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    OPTConfig,
)

from mm_lens import HookedMLLM
from mm_lens.neurons.collection import collect_neuron_stats
from mm_lens.model.samples import prompt_batch, sample_chunks
from mm_lens.analysis.evaluation import score_answers
from mm_lens.model.inputs import MultimodalBatch

PROMPTS = ["what is the color of the shape in this image", "how many", "describe the picture"]


@pytest.fixture(scope="module")
def folder(tiny_folder) -> str:
    return tiny_folder("instructblip")




def image_batch(model, padding_side: str = "left") -> MultimodalBatch:
    """Three prompts of different lengths, one image each, of different sizes."""
    images = [random_image(30, 50, 0), random_image(60, 20, 1), random_image(40, 40, 2)]
    return model.prepare_inputs(PROMPTS, images, padding_side=padding_side)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_equal_hf(model, hf_reference, padding_side):
    batch = image_batch(model, padding_side)
    assert int((batch["attention_mask"] == 0).sum()) > 0
    assert_logits_equal_hf(model, hf_reference, batch)


def test_padding_side_does_not_change_logits(model):
    """The processor puts the query tokens before the padding; the batch's position_ids
    count attended tokens (as HF's generate does), so each row's logits do not depend on
    the padding side."""
    left, right = image_batch(model, "left"), image_batch(model, "right")
    ours_left, ours_right = model(left), model(right)
    for row in range(len(PROMPTS)):
        kept_left, kept_right = left["attention_mask"][row].bool(), right["attention_mask"][row].bool()
        torch.testing.assert_close(ours_left[row, kept_left], ours_right[row, kept_right], atol=1e-5, rtol=0)


def test_positions_are_those_of_hf_generate(model, hf_reference):
    """HF's generate numbers positions from the attention mask itself: its first-step logits
    equal ours at each row's last position, with or without the batch's position_ids."""
    batch = image_batch(model, "left")
    ours = model(batch)[torch.arange(len(PROMPTS)), batch.modality_map.last]
    for inputs in (batch.inputs, {k: v for k, v in batch.items() if k != "position_ids"}):
        generated = hf_reference.generate(
            **inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        torch.testing.assert_close(generated.logits[0], ours, atol=1e-5, rtol=0)


def test_hooks_fire_with_documented_shapes(model):
    batch = image_batch(model)
    _, cache = model.run_with_cache(batch)
    assert_every_hook_fires(model, cache)
    assert_neuron_hooks(model, cache, {"lm_mlp": 2, "vision_mlp": 2, "qformer_intermediate": 2, "qformer_intermediate_query": 2})
    config = model.hf_model.config
    images, (rows, pos) = len(PROMPTS), batch["input_ids"].shape
    patches = 1 + (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    queries, instruction = config.num_query_tokens, batch["qformer_input_ids"].shape[1]
    d_vision, d_qformer, d_model = config.vision_config.hidden_size, config.qformer_config.hidden_size, model.cfg.d_model
    expected = {
        "vision_encoder.hook_in": (images, 3, config.vision_config.image_size, config.vision_config.image_size),
        "vision_encoder.embeddings.hook_out": (images, patches, d_vision),
        "vision_encoder.encoder_layers.0.attn.qkv.hook_out": (images, patches, 3 * d_vision),
        "vision_encoder.encoder_layers.1.mlp.hook_post": (images, patches, config.vision_config.intermediate_size),
        "vision_encoder.hook_out": (images, patches, d_vision),
        "qformer.hook_in": (images, queries, d_qformer),
        "qformer.layers.0.hook_in": (images, queries + instruction, d_qformer),
        "qformer.layers.0.crossattention.k.hook_out": (images, patches, d_qformer),
        "qformer.layers.0.crossattention.hook_out": (images, queries, d_qformer),
        "qformer.layers.1.intermediate_query.hook_act": (images, queries, config.qformer_config.intermediate_size),
        "qformer.layers.1.intermediate.hook_act": (images, instruction, config.qformer_config.intermediate_size),
        "qformer.hook_out": (images, queries + instruction, d_qformer),
        "vision_projector.hook_out": (images, queries, d_model),
        "blocks.0.hook_resid_pre": (rows, pos, d_model),
        "blocks.1.mlp.hook_act": (rows, pos, config.text_config.intermediate_size),
    }
    assert {name: tuple(cache[name].shape) for name in expected} == expected
    # cross-attention on every cross_attention_frequency-th Q-Former layer only, as in HF
    assert "qformer.layers.1.crossattention.hook_out" not in model.hook_dict


def test_neuron_hooks_are_hf_activations(model, hf_reference):
    """Each encoder neuron hook equals the output of HF's own module, caught by a plain
    PyTorch hook on the untouched model."""
    batch = image_batch(model)
    _, cache = model.run_with_cache(batch)
    qformer, vision = hf_reference.qformer.encoder.layer, hf_reference.vision_model.encoder.layers
    for layer in range(2):
        references = {
            f"vision_encoder.encoder_layers.{layer}.mlp.hook_post": vision[layer].mlp.activation_fn,
            f"qformer.layers.{layer}.intermediate_query.hook_act": qformer[layer].intermediate_query,
            f"qformer.layers.{layer}.intermediate.hook_act": qformer[layer].intermediate,
        }
        for name, module in references.items():
            (reference,) = hf_module_outputs(hf_reference, module, batch)
            torch.testing.assert_close(cache[name], reference, atol=1e-6, rtol=0)


def test_queries_sit_where_the_map_says(model, hf_reference):
    batch = image_batch(model)
    _, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
    (projected,) = hf_module_outputs(hf_reference, hf_reference.language_projection, batch)
    assert_features_at_positions(batch, cache["blocks.0.hook_resid_pre"], {"image": projected.flatten(0, 1)})
    mm, queries = batch.modality_map, model.hf_model.config.num_query_tokens
    assert mm.grids == ((),) * len(PROMPTS)
    assert torch.equal(mm.image_row, torch.arange(len(PROMPTS)))
    for image in range(len(PROMPTS)):
        row, positions = mm.image_positions(image)
        assert torch.equal(positions, torch.arange(queries))  # the processor puts them first
        assert torch.equal(mm.feature[row, positions], image * queries + torch.arange(queries))
        assert (mm.row[row, positions] == -1).all() and (mm.col[row, positions] == -1).all()
        assert (mm.tile[row, positions] == 0).all()


def test_chat_false_takes_prompts_without_image_tokens(model):
    chat = model.prepare_inputs(PROMPTS[:1], [random_image(30, 50, 0)])
    text = model.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0]}]}], add_generation_prompt=True
    )
    plain = model.prepare_inputs([text], [random_image(30, 50, 0)], chat=False)
    assert torch.equal(plain["input_ids"], chat["input_ids"])
    with pytest.raises(ValueError, match="puts the image tokens before the prompt itself; write no <image>"):
        model.prepare_inputs(["<image> " + text], [random_image(30, 50, 0)], chat=False)


def test_bad_inputs_fail_clearly(model):
    batch = dict(image_batch(model).inputs)
    image_token = model.hf_model.config.image_token_id
    with pytest.raises(ValueError, match=r"the batch has 2 prompt\(s\) but 1 image\(s\); InstructBLIP takes exactly one image per prompt"):
        model.prepare_inputs(PROMPTS[:2], [random_image(30, 50, 0), None])
    with pytest.raises(ValueError, match=r"the batch has 1 prompt\(s\) but 0 image\(s\)"):
        model.prepare_inputs(PROMPTS[:1], None)
    with pytest.raises(ValueError, match=r"the batch has 1 prompt\(s\) but 2 image\(s\)"):
        model.prepare_inputs(PROMPTS[:1], [[random_image(30, 50, 0), random_image(20, 20, 1)]])
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        model({k: v for k, v in batch.items() if k != "pixel_values"})
    no_tokens = batch["input_ids"].masked_fill(batch["input_ids"] == image_token, 4)
    with pytest.raises(ValueError, match="pixel_values were given but input_ids hold no image token"):
        model({**batch, "input_ids": no_tokens})
    one_short = batch["input_ids"].clone()
    one_short[1, 0] = 4
    with pytest.raises(ValueError, match="row 1 holds 7 image tokens but InstructBLIP puts num_query_tokens"):
        model({**batch, "input_ids": one_short})
    with pytest.raises(ValueError, match=r"qformer_input_ids must hold the instruction of each of the 3 prompts"):
        model({**batch, "qformer_input_ids": batch["qformer_input_ids"][:2]})
    with pytest.raises(ValueError, match="qformer_input_ids must hold"):
        model({k: v for k, v in batch.items() if k != "qformer_input_ids"})
    with pytest.raises(ValueError, match="qformer_attention_mask has shape"):
        model({**batch, "qformer_attention_mask": batch["qformer_attention_mask"][:, :-1]})


def test_other_language_models_are_refused(folder):
    """The adapter maps a Llama language model; InstructBLIP with another (OPT here) is refused
    before any weight is loaded."""
    config = InstructBlipConfig.from_pretrained(folder)
    config.text_config = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4)
    with pytest.raises(ValueError, match="Llama \\(Vicuna\\) language model.*'opt'"):
        HookedMLLM.from_pretrained(folder, hf_model=InstructBlipForConditionalGeneration(config))


def test_encoder_neuron_zeroing_matches_hf_hook(model, hf_reference):
    """Zeroing Q-Former query neurons through mm_lens' hook equals zeroing HF's
    ``intermediate_query`` output with a plain PyTorch hook, and changes the logits."""
    batch, channels = image_batch(model), [0, 3, 5]

    def zero(act, hook):
        act[..., channels] = 0.0
        return act

    ours = model.run_with_hooks(batch, fwd_hooks=[("qformer.layers.1.intermediate_query.hook_act", zero)])
    handle = hf_reference.qformer.encoder.layer[1].intermediate_query.register_forward_hook(
        lambda module, args, out: out.index_fill(-1, torch.tensor(channels), 0.0)
    )
    try:
        reference = hf_reference(**batch).logits
    finally:
        handle.remove()
    mask = batch["attention_mask"].bool()
    assert (ours - reference)[mask].abs().max() <= 1e-5
    assert (ours - model(batch))[mask].abs().max() > 1e-6


def test_encoder_statistics_count_every_image(model):
    """Vision rows are 1 + patches per image, Q-Former query rows num_query_tokens, and
    instruction rows the Q-Former's unpadded instruction tokens, all in the image class."""
    samples = [{"question": p, "image": random_image(30, 40, i), "domain": "d"} for i, p in enumerate(PROMPTS)]
    stats = collect_neuron_stats(model, samples, batch_size=2, progress=False)
    config = model.hf_model.config
    patches = 1 + (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    assert stats.n_tokens("vision_mlp", "image")[0].sum() == 3 * patches
    assert stats.n_tokens("qformer_intermediate_query", "image")[0].sum() == 3 * config.num_query_tokens
    batches = [prompt_batch(model, chunk) for _, chunk in sample_chunks(samples, 2)]
    instruction_rows = sum(int(batch["qformer_attention_mask"].sum()) for batch in batches)
    assert instruction_rows < sum(batch["qformer_attention_mask"].numel() for batch in batches)  # some padding left out
    assert stats.n_tokens("qformer_intermediate", "image")[0].sum() == instruction_rows


def test_shared_architecture_checks_hold(model, hf_reference):
    batch = image_batch(model)
    assert_zeroing_matches_hf_hook(model, hf_reference, batch)
    # InstructBLIP needs an image in every row: the shared samples' text-only rows get one.
    samples = [{**s, "image": s["image"] or random_image(40, 60, i)} for i, s in enumerate(make_samples(6, VARIED_SIZES))]
    prompts = ["what is the color", "how many are there"]  # same length: patching needs rows alike
    clean = model.prepare_inputs(prompts, [random_image(30, 50, 0)] * 2)
    corrupted = model.prepare_inputs(prompts, [random_image(30, 50, 9)] * 2)
    assert_analyses_run(
        model, samples, clean, corrupted, real_rows=lambda batch: {"qformer_intermediate": batch["qformer_attention_mask"].bool()}
    )


def test_answer_scoring_equals_hf_with_the_qformer_reading_the_question_only(model, hf_reference):
    """Evaluation's teacher-forced pass builds prompts with chat=False (no image tokens: the
    processor adds the queries), and the Q-Former must read the question, not the answer."""
    samples = [{"question": q, "image": random_image(30, 40, i), "domain": "d", "answer": a}
               for i, (q, a) in enumerate([("what is the color", "red"), ("how many are there", "two")])]
    scores = score_answers(model, samples, batch_size=2, max_new_tokens=2)
    assert len(scores.predictions) == 2
    for score, s in zip(scores.answer_logprob, samples):
        content = [{"type": "image"}, {"type": "text", "text": s["question"]}]
        media = {"images": [s["image"]]}
        reference = hf_answer_logprob(hf_reference, model.processor, content, s["answer"], media, ("qformer_input_ids", "qformer_attention_mask"))
        assert abs(float(score) - reference) < 1e-4
        answer_read_too = hf_answer_logprob(hf_reference, model.processor, content, s["answer"], media)
        assert abs(float(score) - answer_read_too) > 1e-4  # the Q-Former input matters here


def test_generation_equals_hf(model, hf_reference):
    from checks import assert_generation_equals_hf

    assert_generation_equals_hf(model, hf_reference, image_batch(model, "left"))
