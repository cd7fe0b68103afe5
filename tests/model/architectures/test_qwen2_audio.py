"""Qwen2-Audio: logits equal HF's, every hook fires, audio features sit where the
ModalityMap says (clips of different lengths, text-only rows, both paddings), bad audio
inputs fail clearly, and every analysis (MINER on text/audio included) runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checks import (
    assert_analyses_run,
    assert_every_hook_fires,
    assert_features_at_positions,
    assert_logits_equal_hf,
    assert_neuron_hooks,
    assert_zeroing_matches_hf_hook,
    hf_module_outputs,
)
from transformers import Qwen2AudioForConditionalGeneration

from mm_lens import HookedMLLM
from mm_lens.model.architectures.qwen2_audio import audio_token_counts
from mm_lens.neurons.collection import collect_neuron_stats
from mm_lens.model.samples import prompt_batch, sample_chunks

RATE = 16000  # the tiny feature extractor's sampling rate; a clip is padded to 1 s (100 frames)
PROMPTS = ["what is this", "how many are there", "describe the picture"]


def waveform(n_samples: int, seed: int, kind: str = "noise") -> np.ndarray:
    """A 1-d float32 clip: white noise, a tone or a chirp."""
    t = np.arange(n_samples) / RATE
    if kind == "tone":
        return (0.5 * np.sin(2 * np.pi * (220 + 40 * seed) * t)).astype(np.float32)
    if kind == "chirp":
        return (0.5 * np.sin(2 * np.pi * (100 + 2000 * t) * t)).astype(np.float32)
    return (0.1 * np.random.RandomState(seed).randn(n_samples)).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tiny_folder) -> str:
    return tiny_folder("qwen2_audio")



@pytest.fixture(scope="module")
def hf_reference(folder):
    """An untouched HF model of the same folder (the bridge rewires its own copy)."""
    return Qwen2AudioForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


def mixed_batch(model, padding_side: str = "left"):
    """Two clips of different lengths in one prompt, a full-length clip, a text-only row."""
    audios = [[waveform(7000, 1), waveform(3000, 2, "tone")], waveform(16000, 3), None]
    return model.prepare_inputs(PROMPTS, audios=audios, padding_side=padding_side)


def used_features(hf_model, batch) -> torch.Tensor:
    """HF's projected audio features ``[n, d]``, each clip's unpadded rows, clip after clip,
    from the untouched model's own projector and length formula."""
    (projected,) = hf_module_outputs(hf_model, hf_model.model.multi_modal_projector, batch)
    _, lengths = hf_model.model.audio_tower._get_feat_extract_output_lengths(batch["feature_attention_mask"].sum(-1))
    keep = torch.arange(projected.shape[1])[None, :] < lengths[:, None]
    return projected[keep]


def test_token_count_formula_equals_hf(hf_reference):
    frames = torch.arange(0, 301)
    _, expected = hf_reference.model.audio_tower._get_feat_extract_output_lengths(frames)
    assert torch.equal(audio_token_counts(frames), expected)


@pytest.mark.parametrize("n_samples", [500, 1000, 3000, 7000, 12345, 16000, 20000])
def test_layout_length_equals_processor_expansion(model, n_samples):
    batch = model.prepare_inputs(["what"], audios=[waveform(n_samples, seed=n_samples)])
    n_tokens = int((batch["input_ids"] == model.hf_model.config.audio_token_id).sum())
    (layout,) = model.spec.layouts(model.hf_model.config, batch.inputs)
    assert len(layout) == n_tokens == layout.n_features
    assert layout.modality == "audio" and layout.grids == () and layout.n_tiles == 1
    assert (layout.row == -1).all() and (layout.col == -1).all() and (layout.tile == 0).all()
    assert torch.equal(layout.feature, torch.arange(n_tokens))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_equal_hf(model, hf_reference, padding_side):
    assert_logits_equal_hf(model, hf_reference, mixed_batch(model, padding_side))


def test_compatibility_mode_log_probs_equal_hf(folder, hf_reference):
    processed = HookedMLLM.from_pretrained(folder, compatibility_mode=True)
    batch = mixed_batch(processed)
    mask = batch["attention_mask"].bool()
    difference = processed(batch).log_softmax(-1) - hf_reference(**batch).logits.log_softmax(-1)
    assert difference[mask].abs().max() <= 1e-5


def test_text_only_batch_equals_hf(model, hf_reference):
    batch = model.prepare_inputs(PROMPTS[:2], audios=None)
    assert "input_features" not in batch
    assert_logits_equal_hf(model, hf_reference, batch)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_audio_positions_hold_hf_features_clip_by_clip(model, hf_reference, padding_side):
    batch = mixed_batch(model, padding_side)
    _, cache = model.run_with_cache(batch, names_filter=["blocks.0.hook_resid_pre"])
    features = used_features(hf_reference, batch)
    assert_features_at_positions(batch, cache["blocks.0.hook_resid_pre"], {"audio": features})
    mm = batch.modality_map
    assert mm.item_modality == ("audio", "audio", "audio")
    assert mm.image_row.tolist() == [0, 0, 1] and mm.image_tiles.tolist() == [1, 1, 1]
    assert mm.grids == ((), (), ()) and not mm.mask("audio")[2].any()
    assert (mm.row[mm.mask("audio")] == -1).all() and (mm.col[mm.mask("audio")] == -1).all()
    lengths = [len(mm.image_positions(clip)[1]) for clip in range(3)]
    assert lengths == audio_token_counts(batch["feature_attention_mask"].sum(-1)).tolist() == [11, 5, 25]
    for clip in range(3):  # each clip's tokens are one run, features in time order
        _, positions = mm.image_positions(clip)
        assert (positions.diff() == 1).all()
        row = int(mm.image_row[clip])
        assert (mm.feature[row, positions].diff() == 1).all()


def test_every_hook_fires_with_documented_shapes(model):
    batch = mixed_batch(model)
    _, cache = model.run_with_cache(batch)
    assert_every_hook_fires(model, cache)
    assert_neuron_hooks(model, cache, {"lm_mlp": 2, "audio_mlp": 2})
    config = model.hf_model.config
    clips, frames, heads = 3, config.audio_config.max_source_positions, config.audio_config.encoder_attention_heads
    batch_size, pos = batch["input_ids"].shape
    shapes = {
        "audio_encoder.hook_in": (clips, config.audio_config.num_mel_bins, 2 * frames),
        "audio_encoder.encoder_layers.0.hook_resid_pre": (clips, frames, config.audio_config.d_model),
        "audio_encoder.encoder_layers.1.mlp.hook_post": (clips, frames, config.audio_config.encoder_ffn_dim),
        "audio_encoder.encoder_layers.0.attn.hook_z": (clips, frames, heads, config.audio_config.d_model // heads),
        "audio_encoder.encoder_layers.0.attn.hook_pattern": (clips, heads, frames, frames),
        "audio_encoder.hook_out": (clips, frames // 2, config.audio_config.d_model),
        "audio_projector.hook_out": (clips, frames // 2, config.text_config.hidden_size),
        "blocks.0.mlp.hook_act": (batch_size, pos, config.text_config.intermediate_size),
        "blocks.1.hook_resid_post": (batch_size, pos, config.text_config.hidden_size),
    }
    assert {name: tuple(cache[name].shape) for name in shapes} == shapes


def test_audio_mlp_hook_is_hf_activation(model, hf_reference):
    """``audio_encoder.encoder_layers.{l}.mlp.hook_post`` is ``act(fc1(x))`` of HF's layer."""
    batch = mixed_batch(model)
    _, cache = model.run_with_cache(batch, names_filter=lambda name: name.endswith("mlp.hook_post"))
    for layer, hf_layer in enumerate(hf_reference.model.audio_tower.layers):
        (reference,) = hf_module_outputs(hf_reference, hf_layer.activation_fn, batch)
        torch.testing.assert_close(cache[f"audio_encoder.encoder_layers.{layer}.mlp.hook_post"], reference, atol=1e-6, rtol=0)


def test_features_without_audio_tokens_are_rejected(model):
    batch = mixed_batch(model)
    text_only = model.prepare_inputs(PROMPTS, audios=None)
    with pytest.raises(ValueError, match="input_features were given but input_ids hold no audio token"):
        model(input_ids=text_only["input_ids"], attention_mask=text_only["attention_mask"], input_features=batch["input_features"], feature_attention_mask=batch["feature_attention_mask"])


def test_audio_tokens_without_features_are_rejected(model):
    batch = mixed_batch(model)
    with pytest.raises(ValueError, match="no input_features were given"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_token_count_not_matching_clips_is_rejected(model):
    batch = dict(mixed_batch(model).inputs)
    ids = batch["input_ids"].clone()
    first = torch.nonzero(ids[1] == model.hf_model.config.audio_token_id).flatten()[0]
    ids[1, first] = model.processor.tokenizer.convert_tokens_to_ids("what")
    with pytest.raises(ValueError, match="input_ids hold 40 audio tokens but the 3 audio"):
        model({**batch, "input_ids": ids})


def test_inconsistent_feature_mask_is_rejected(model):
    batch = dict(mixed_batch(model).inputs)
    with pytest.raises(ValueError, match="need their feature_attention_mask"):
        model({k: v for k, v in batch.items() if k != "feature_attention_mask"})
    with pytest.raises(ValueError, match="feature_attention_mask has shape .* describe 3 clips"):
        model({**batch, "feature_attention_mask": batch["feature_attention_mask"][:2]})
    with pytest.raises(ValueError, match="the audio encoder takes \\[clips, 16, 100\\]"):
        model({**batch, "input_features": batch["input_features"][..., :80], "feature_attention_mask": batch["feature_attention_mask"][:, :80]})


def test_clip_without_audio_tokens_is_rejected(model):
    batch = dict(mixed_batch(model).inputs)
    mask = batch["feature_attention_mask"].clone()
    mask[1, 2:] = 0
    with pytest.raises(ValueError, match="audio clips \\[1\\] are too short"):
        model({**batch, "feature_attention_mask": mask})


def test_unexpanded_prompt_is_rejected(model):
    """One audio token for a clip of 25 features (the prompt not expanded by the processor)."""
    expanded = model.prepare_inputs(["what"], audios=[waveform(16000, 0)])
    token = model.processor.audio_token
    encoded = model.processor.tokenizer([f"USER : <|audio_bos|> {token} <|audio_eos|> what ASSISTANT :"], return_tensors="pt")
    with pytest.raises(ValueError, match="input_ids hold 1 audio tokens but the 1 audio\\(s\\) give 25 features"):
        model(dict(encoded), input_features=expanded["input_features"], feature_attention_mask=expanded["feature_attention_mask"])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_single_token_clips_take_hf_legacy_merge_and_stay_mapped(model, hf_reference, padding_side):
    """Clips of one audio token each: no two audio tokens are adjacent, so HF merges them
    on its legacy path; the map still holds each clip's feature at its token."""
    batch = model.prepare_inputs(PROMPTS, audios=[waveform(500, 0), None, [waveform(600, 1), waveform(400, 2)]], padding_side=padding_side)
    assert [len(model.spec.layouts(model.hf_model.config, batch.inputs)[i]) for i in range(3)] == [1, 1, 1]
    assert_logits_equal_hf(model, hf_reference, batch)
    _, cache = model.run_with_cache(batch, names_filter=["blocks.0.hook_resid_pre"])
    assert_features_at_positions(batch, cache["blocks.0.hook_resid_pre"], {"audio": used_features(hf_reference, batch)})


def test_zeroing_lm_neurons_matches_hf_hook(model, hf_reference):
    assert_zeroing_matches_hf_hook(model, hf_reference, mixed_batch(model))


def audio_samples(n: int = 6) -> list[dict]:
    """Samples of three sound domains; every fourth has no audio (text-only rows)."""
    kinds = ("noise", "tone", "chirp")
    questions = ["what is this", "how many are there", "describe the picture", "is there a car"]
    answers = ["red", "two", "a road", "no"]
    return [
        {
            "question": questions[i % 4],
            "audio": None if i % 4 == 3 else waveform(4000 + 2000 * i, i, kinds[i % 3]),
            "domain": kinds[i % 3],
            "answer": answers[i % 4],
        }
        for i in range(n)
    ]


def test_analyses_run_on_text_and_audio(model, hf_reference):
    prompts = ["what is the color", "how many are there"]  # same length: patching needs rows placed alike
    clean = model.prepare_inputs(prompts, audios=[waveform(9000, 0), waveform(9000, 1, "tone")])
    corrupted = model.prepare_inputs(prompts, audios=[waveform(9000, 5), waveform(9000, 6, "chirp")])
    assert torch.equal(clean.modality_map.modality, corrupted.modality_map.modality)
    assert_analyses_run(model, audio_samples(), clean, corrupted, media="audio", real_rows=_unpadded_encoder_frames(hf_reference))


def _unpadded_encoder_frames(hf_model):
    """Reference for the audio encoder's real rows: the untouched HF model's output-length
    function gives each clip's frames after the stride-2 convolution (its first value)."""
    length_of = hf_model.model.audio_tower._get_feat_extract_output_lengths
    positions = torch.arange(hf_model.config.audio_config.max_source_positions)

    def real_rows(batch):
        frames, _ = length_of(batch["feature_attention_mask"].sum(-1))
        return {"audio_mlp": positions[None, :] < frames[:, None]}

    return real_rows


def test_audio_statistics_count_unpadded_encoder_frames_only(model, hf_reference):
    samples = [s for s in audio_samples() if s["audio"] is not None]
    stats = collect_neuron_stats(model, samples, batch_size=2, progress=False)  # default classes: audio, text, all, last
    batches = [prompt_batch(model, chunk) for _, chunk in sample_chunks(samples, 2)]
    real = sum(int(_unpadded_encoder_frames(hf_reference)(batch)["audio_mlp"].sum()) for batch in batches)
    assert real < len(samples) * model.hf_model.config.audio_config.max_source_positions  # padding left out
    assert int(stats.n_tokens("audio_mlp", "audio").sum()) == real


def test_miner_pipeline_runs_on_text_and_audio(model, tmp_path):
    from mm_lens.pipelines import run_miner

    speech = [s for s in audio_samples(8) if s["audio"] is not None][:4]
    text_only = [dict(s, audio=None) for s in audio_samples(3)]
    run = run_miner(model, {"sounds": speech, "text": text_only}, tmp_path, modalities=("text", "audio"), ratio=0.1,
                    seeds=(0,), evaluation_samples=3, max_new_tokens=2, progress=False)
    assert run.deactivation.groups == ["text", "audio", "(all)"]
    assert run.scores.present.tolist() == [[True, True], [True, False]]  # datasets sorted as given: sounds, text
    assert "audio" in (tmp_path / "neurons.txt").read_text() and (tmp_path / "report.html").stat().st_size > 0


def test_answer_scoring_hears_the_audio(model, hf_reference):
    """Teacher-forced answer log-probabilities equal HF's on the prompt with its clip."""
    from checks import hf_answer_logprob

    from mm_lens.analysis.evaluation import score_answers

    samples = [{"question": q, "audio": waveform(6000 + 3000 * i, i, kind), "answer": a}
               for i, (q, a, kind) in enumerate([("what is this", "red", "tone"), ("how many are there", "two", "noise")])]
    scores = score_answers(model, samples, batch_size=2, max_new_tokens=2)
    for score, s in zip(scores.answer_logprob, samples):
        content = [{"type": "audio"}, {"type": "text", "text": s["question"]}]
        reference = hf_answer_logprob(hf_reference, model.processor, content, s["answer"], {"audio": [s["audio"]]})
        assert abs(float(score) - reference) < 1e-4
        deaf = hf_answer_logprob(hf_reference, model.processor, content[1:], s["answer"], {})
        assert abs(float(score) - deaf) > 1e-4  # the clip matters


def test_generation_equals_hf(model, hf_reference):
    from checks import assert_generation_equals_hf

    assert_generation_equals_hf(model, hf_reference, mixed_batch(model, "left"))
