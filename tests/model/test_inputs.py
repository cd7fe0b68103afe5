"""Bad input gets a clear error naming the problem."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mm_lens import HookedMLLM, UnsupportedArchitectureError
from mm_lens.model.tiny.common import build_word_tokenizer


@pytest.fixture(scope="module")
def batch_of(models, images):
    return {arch: m.prepare_inputs(["what", "how many"], [images[0], images[1]]) for arch, m in models.items()}


def test_image_tokens_without_pixel_values(model, batch_of, arch):
    inputs = {k: v for k, v in batch_of[arch].items() if k not in ("pixel_values", "image_sizes")}
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        model(**inputs)


def test_pixel_values_without_image_tokens(model, batch_of, arch):
    text_only = model.prepare_inputs(["what is the color"])
    inputs = {**text_only.inputs, **{k: v for k, v in batch_of[arch].items() if k in ("pixel_values", "image_sizes")}}
    with pytest.raises(ValueError, match="pixel_values were given but input_ids hold no image token"):
        model(**inputs)


def test_image_token_count_not_matching_images(model, batch_of, arch):
    inputs = dict(batch_of[arch].inputs)
    image_token = model.hf_model.config.image_token_id
    ids = inputs["input_ids"].clone()
    first = int(torch.nonzero(ids[0] == image_token)[0])
    ids[0, first] = model.processor.tokenizer.convert_tokens_to_ids("red")
    with pytest.raises(ValueError, match=r"image tokens but the 2 image\(s\) give"):
        model(**{**inputs, "input_ids": ids})


def test_more_images_than_prompts_have_tokens(model, batch_of, images, arch):
    one = model.prepare_inputs(["what"], [images[0]])
    with pytest.raises(ValueError, match="image tokens but the 2 image"):
        model(**{**one.inputs, **{k: v for k, v in batch_of[arch].items() if k in ("pixel_values", "image_sizes")}})


def test_attention_mask_batch_size_mismatch(model, batch_of, arch):
    inputs = dict(batch_of[arch].inputs)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(**{**inputs, "attention_mask": inputs["attention_mask"][:1]})


def test_image_sizes_count_mismatch(models, batch_of):
    inputs = dict(batch_of["llava_next"].inputs)
    with pytest.raises(ValueError, match="image_sizes describe 1 images but pixel_values hold 2"):
        models["llava_next"](**{**inputs, "image_sizes": inputs["image_sizes"][:1]})


def test_prompts_and_images_count_mismatch(model, images):
    with pytest.raises(ValueError, match="2 prompts but 1 image entries"):
        model.prepare_inputs(["what", "how"], [images[0]])


def test_raw_prompt_with_wrong_number_of_image_tokens(model, images):
    with pytest.raises(ValueError, match="prompt has 1 <image> tokens but 2 images"):
        model.prepare_inputs(["USER : <image> what"], [[images[0], images[1]]], chat=False)


def test_raw_prompt_with_image_tokens_runs(model, images):
    batch = model.prepare_inputs(["USER : <image> what ASSISTANT :"], [images[0]], chat=False)
    assert batch.modality_map.n_images == 1
    assert model(batch).shape[0] == 1


def test_single_string_prompt_is_rejected(model):
    with pytest.raises(ValueError, match="list of strings"):
        model.prepare_inputs("what is the color")


def test_unsupported_architecture_lists_supported(tmp_path):
    tokenizer = build_word_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM.*LlavaForConditionalGeneration, LlavaNextForConditionalGeneration"):
        HookedMLLM.from_pretrained(tmp_path)


def test_missing_processor_is_a_clear_error(model_folders, tmp_path):
    import shutil

    folder = tmp_path / "no_processor"
    shutil.copytree(model_folders["llava"], folder)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="could not load a processor"):
        HookedMLLM.from_pretrained(folder)


def test_empty_prompt_list_is_rejected(model):
    with pytest.raises(ValueError, match="no prompts"):
        model.prepare_inputs([])


def test_padding_side_of_the_tokenizer_is_left_as_it_was(model, images):
    before = model.processor.tokenizer.padding_side
    model.prepare_inputs(["what", "how many are there"], [images[0], None], padding_side="right" if before == "left" else "left")
    assert model.processor.tokenizer.padding_side == before


def test_answer_tokens_are_the_continuation_of_the_prompt(model, images):
    from mm_lens.model.inputs import answer_token_ids, sample_prompt

    prompt = sample_prompt(model.processor, "what is the color", images[0])
    ids = answer_token_ids(model.processor, prompt, "red car")
    assert model.processor.tokenizer.convert_ids_to_tokens(ids) == ["red", "car"]
