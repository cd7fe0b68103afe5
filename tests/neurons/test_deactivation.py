"""Deactivation hooks: which channels, which positions, which values; generation; bad input."""

from __future__ import annotations

import pytest
import torch

from helpers import hf_logits_with_act_zeroed
from mm_lens.neurons.deactivation import deactivated, deactivation_hooks

LM_HOOK = "blocks.{layer}.mlp.hook_act"


@pytest.fixture(scope="module")
def batch(model, images):
    """A row with an image and a text-only row, left-padded."""
    return model.prepare_inputs(["what is the color", "how many are there"], [images[0], None])


@pytest.fixture(scope="module")
def clean(model, batch):
    """Logits and every neuron hook's tensor of ``batch`` with no hook added."""
    names = {name for hooks in model.neuron_hooks.values() for name in hooks}
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch, names_filter=lambda name: name in names)
    return {"logits": logits, **{name: cache[name] for name in names}}


def lm_neurons(model, chosen: dict[int, list[int]]) -> dict[str, list[torch.Tensor]]:
    n_layers = len(model.neuron_hooks["lm_mlp"])
    return {"lm_mlp": [torch.tensor(chosen.get(layer, []), dtype=torch.long) for layer in range(n_layers)]}


def hooked_values(model, batch, fwd_hooks, names):
    """The tensors at ``names`` as later hooks see them, with ``fwd_hooks`` active."""
    with model.hooks(fwd_hooks=fwd_hooks):
        _, cache = model.run_with_cache(batch, names_filter=lambda name: name in names)
    return {name: cache[name] for name in names}


def assert_only_region_set(clean, after, channels, where, expected):
    """``after`` equals ``clean`` outside (positions ``where``) x ``channels``, and
    ``expected`` (broadcast to the channels) inside."""
    region = torch.zeros_like(clean, dtype=torch.bool)
    region[..., channels] = True
    if where is not None:
        region &= where.unsqueeze(-1)
    assert torch.equal(after[~region], clean[~region])
    target = torch.as_tensor(expected, dtype=clean.dtype).expand(*clean.shape[:-1], len(channels))
    assert torch.equal(after[..., channels][region[..., channels]], target[region[..., channels]])


def test_zero_mode_sets_exactly_the_chosen_channels_to_zero_at_every_position(model, batch, clean):
    name = LM_HOOK.format(layer=1)
    after = hooked_values(model, batch, deactivation_hooks(model, lm_neurons(model, {1: [0, 3, 5]})), [name])[name]
    assert_only_region_set(clean[name], after, [0, 3, 5], None, 0.0)


def test_layers_with_no_chosen_neuron_add_no_hook(model):
    hooks = deactivation_hooks(model, lm_neurons(model, {1: [2]}))
    assert [name for name, _ in hooks] == [LM_HOOK.format(layer=1)]


def test_mean_mode_writes_each_neurons_own_mean(model, batch, clean):
    name = LM_HOOK.format(layer=0)
    n_layers = len(model.neuron_hooks["lm_mlp"])
    means = {"lm_mlp": torch.randn(n_layers, model.cfg.d_mlp, generator=torch.Generator().manual_seed(0))}
    hooks = deactivation_hooks(model, lm_neurons(model, {0: [1, 7]}), mode="mean", means=means)
    after = hooked_values(model, batch, hooks, [name])[name]
    assert_only_region_set(clean[name], after, [1, 7], None, means["lm_mlp"][0, [1, 7]])


def test_min_mode_writes_the_minimum_of_the_whole_hooked_tensor(model, batch, clean):
    name = LM_HOOK.format(layer=0)
    hooks = deactivation_hooks(model, lm_neurons(model, {0: [2, 4]}), mode="min")
    after = hooked_values(model, batch, hooks, [name])[name]
    assert clean[name].min() < 0  # SiLU goes below zero: min differs from zero mode
    assert_only_region_set(clean[name], after, [2, 4], None, clean[name].min())


def test_constant_mode_writes_the_given_value(model, batch, clean):
    name = LM_HOOK.format(layer=1)
    hooks = deactivation_hooks(model, lm_neurons(model, {1: [6]}), mode="constant", value=2.5)
    after = hooked_values(model, batch, hooks, [name])[name]
    assert_only_region_set(clean[name], after, [6], None, 2.5)


@pytest.mark.parametrize("positions", ["image", "text", ("image", "special"), "last"])
def test_positions_restrict_the_change_to_those_positions(model, batch, clean, positions):
    name = LM_HOOK.format(layer=0)
    mm = batch.modality_map
    names = (positions,) if isinstance(positions, str) else positions
    where = mm.last_mask() if names == ("last",) else mm.mask(*names)
    assert where.any() and not where.all()
    hooks = deactivation_hooks(model, lm_neurons(model, {0: [3, 9]}), positions=positions, modality_map=mm)
    after = hooked_values(model, batch, hooks, [name])[name]
    assert_only_region_set(clean[name], after, [3, 9], where, 0.0)


def test_a_region_mask_switches_lm_neurons_off_under_the_region_only(model, batch, clean, images):
    from mm_lens.model.regions import region_positions

    name = LM_HOOK.format(layer=0)
    mm = batch.modality_map
    region = region_positions(model, batch, (0, 0, 20, 15), images=[images[0]])
    where = region.mask
    assert where.any() and (where & ~mm.mask("image")).sum() == 0
    neurons = {**lm_neurons(model, {0: [3, 9]}), "vision_mlp": [torch.tensor([1])] * len(model.neuron_hooks["vision_mlp"])}
    hooks = deactivation_hooks(model, neurons, positions=where, modality_map=mm)
    assert {hook for hook, _ in hooks} == {name}  # the mask is of LM positions: the tower stays as it is
    after = hooked_values(model, batch, hooks, [name])[name]
    assert_only_region_set(clean[name], after, [3, 9], where, 0.0)
    with pytest.raises(ValueError, match=r"boolean \[batch, pos\] mask"):
        deactivation_hooks(model, neurons, positions=where.long())
    with pytest.raises(ValueError, match="the positions mask has shape"):
        deactivation_hooks(model, neurons, positions=where[:, 1:], modality_map=mm)


def test_complementary_deactivates_every_other_neuron_of_the_listed_layers(model, batch, clean):
    names = [LM_HOOK.format(layer=0), LM_HOOK.format(layer=1)]
    hooks = deactivation_hooks(model, lm_neurons(model, {0: [1, 4]}), complementary=True)
    assert [name for name, _ in hooks] == names  # layer 1 has no kept neuron: all of it goes
    after = hooked_values(model, batch, hooks, names)
    others = [i for i in range(model.cfg.d_mlp) if i not in (1, 4)]
    assert_only_region_set(clean[names[0]], after[names[0]], others, None, 0.0)
    assert (after[names[1]] == 0).all()


def test_zeroing_lm_neurons_matches_an_hf_forward_hook_on_act_fn(model, hf_reference, batch, clean):
    channels = [0, 3, 5]
    ours = model.run_with_hooks(batch, fwd_hooks=deactivation_hooks(model, lm_neurons(model, {1: channels})))
    reference = hf_logits_with_act_zeroed(hf_reference, batch, 1, channels)
    mask = batch["attention_mask"].bool()
    assert (ours - reference)[mask].abs().max() <= 1e-5
    assert (ours - clean["logits"])[mask].abs().max() > 1e-4


@pytest.mark.parametrize("module", ["vision_mlp", "projector"])
def test_vision_side_deactivation_changes_logits_and_every_patch(model, batch, clean, module):
    n_layers = len(model.neuron_hooks[module])
    # layer 0: LLaVA reads the vision tower's second-to-last layer, the last one is unused
    neurons = {module: [torch.arange(0, 16, 2)] + [torch.tensor([], dtype=torch.long)] * (n_layers - 1)}
    name = model.neuron_hooks[module][0]
    with model.hooks(fwd_hooks=deactivation_hooks(model, neurons)):
        logits, after = model.run_with_cache(batch, names_filter=lambda n: n == name)
    assert_only_region_set(clean[name], after[name], list(range(0, 16, 2)), None, 0.0)
    assert (logits - clean["logits"]).abs().max() > 1e-4


def test_vision_side_hooks_are_added_only_when_image_positions_are_chosen(model, batch):
    modules = ("vision_mlp", "projector")
    neurons = {module: [torch.tensor([0])] * len(model.neuron_hooks[module]) for module in modules}
    mm = batch.modality_map
    assert deactivation_hooks(model, neurons, positions=("text", "last"), modality_map=mm) == []
    hooks = deactivation_hooks(model, neurons, positions="image", modality_map=mm)
    assert [name for name, _ in hooks] == [name for module in modules for name in model.neuron_hooks[module]]


@pytest.mark.parametrize(
    "positions, decode_touched", [("image", False), ("text", True), ("last", True), (("special", "image"), False)]
)
def test_decode_step_tokens_count_as_generated_text(model, batch, positions, decode_touched):
    neurons = lm_neurons(model, {0: [1]})
    ((_, hook_fn),) = deactivation_hooks(model, neurons, positions=positions, modality_map=batch.modality_map)
    step = torch.ones(batch["input_ids"].shape[0], 1, model.cfg.d_mlp)
    out = hook_fn(step, None)
    assert bool((out[..., 1] == 0).all()) is decode_touched
    assert (out[..., [0, 2]] == 1).all()


def test_positions_beyond_the_prompt_count_as_generated_text(model, batch):
    mm = batch.modality_map
    ((_, hook_fn),) = deactivation_hooks(model, lm_neurons(model, {0: [1]}), positions="text", modality_map=mm)
    longer = torch.ones(mm.shape[0], mm.shape[1] + 2, model.cfg.d_mlp)
    touched = hook_fn(longer, None)[..., 1] == 0
    assert torch.equal(touched[:, : mm.shape[1]], mm.mask("text"))
    assert touched[:, mm.shape[1] :].all()


def test_hooks_return_a_new_tensor_and_leave_the_input_alone(model, batch):
    neurons = lm_neurons(model, {0: [1]})
    ((_, hook_fn),) = deactivation_hooks(model, neurons, positions="image", modality_map=batch.modality_map)
    act = torch.ones(*batch.modality_map.shape, model.cfg.d_mlp)
    out = hook_fn(act, None)
    assert (act == 1).all() and (out[..., 1] == 0).any()


def test_greedy_generation_inside_deactivated_matches_repeated_forwards(model, images):
    batch = model.prepare_inputs(["what is the color", "how many are there"], [images[0], images[0]])
    assert batch["attention_mask"].all()  # no padding: generate and a plain loop place tokens alike
    # no <image> (its features would be missing) and no end of sequence (generate pads after it)
    banned = [model.hf_model.config.image_token_id, model.processor.tokenizer.eos_token_id]
    d = model.cfg.d_mlp
    neurons = lm_neurons(model, {0: list(range(0, d, 3)), 1: list(range(1, d, 3))})
    kwargs = dict(positions=("image", "text"), modality_map=batch.modality_map)
    with deactivated(model, neurons, **kwargs):
        generated = model.generate(batch, max_new_tokens=3, suppress_tokens=banned).new_tokens
        ids, extra = batch["input_ids"], {k: v for k, v in batch.items() if k != "input_ids"}
        for _ in range(3):  # no KV cache: the whole sequence is recomputed each step
            extra["attention_mask"] = torch.ones_like(ids)
            logits = model.hf_model(input_ids=ids, use_cache=False, **extra).logits[:, -1]
            logits[:, banned] = -torch.inf
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids[:, batch["input_ids"].shape[1] :])


def test_decode_steps_inside_deactivated_run_the_hooks(model, batch):
    seen = []
    with deactivated(model, lm_neurons(model, {0: [1]}), positions="text", modality_map=batch.modality_map):
        with model.hooks(fwd_hooks=[(LM_HOOK.format(layer=0), lambda act, hook: seen.append(act.clone()))]):
            model.generate(batch, max_new_tokens=3, stop_at_eos=False)
    assert [tuple(act.shape[:2]) for act in seen][1:] == [(2, 1), (2, 1)]
    assert all((act[..., 1] == 0).all() for act in seen[1:])
    assert (seen[0][..., 1][batch.modality_map.mask("text")] == 0).all()  # the prefill follows the map


def test_deactivated_removes_its_hooks_on_exit(model, batch, clean):
    with deactivated(model, lm_neurons(model, {1: [0, 1, 2]})):
        inside = model(batch)
    assert not torch.allclose(inside, clean["logits"])
    assert torch.equal(model(batch), clean["logits"])


def test_an_object_with_union_is_accepted_as_neurons(model, batch):
    class Groups:
        def union(self, groups=None):
            return lm_neurons(model, {1: [0, 3, 5]})

    direct = model.run_with_hooks(batch, fwd_hooks=deactivation_hooks(model, lm_neurons(model, {1: [0, 3, 5]})))
    assert torch.equal(model.run_with_hooks(batch, fwd_hooks=deactivation_hooks(model, Groups())), direct)


def _bad_inputs(model, batch):
    d = model.cfg.d_mlp
    ok = lm_neurons(model, {0: [1]})
    return {
        "unknown module": (dict(neurons={"lm": ok["lm_mlp"]}), "unknown neuron module.*lm_mlp"),
        "layer count": (dict(neurons={"lm_mlp": ok["lm_mlp"][:1]}), "1 layer.*has 2"),
        "index too large": (dict(neurons=lm_neurons(model, {0: [d]})), "out of range"),
        "negative index": (dict(neurons=lm_neurons(model, {0: [-1]})), "out of range"),
        "float indices": (dict(neurons={"lm_mlp": [torch.tensor([0.5]), torch.tensor([1])]}), "integer"),
        "unknown mode": (dict(neurons=ok, mode="off"), "unknown mode"),
        "mean without means": (dict(neurons=ok, mode="mean"), "needs means="),
        "mean of wrong shape": (
            dict(neurons=ok, mode="mean", means={"lm_mlp": torch.zeros(2, d + 1)}),
            r"shape \[layer, neuron\]",
        ),
        "constant without value": (dict(neurons=ok, mode="constant"), "needs value="),
        "unknown position": (
            dict(neurons=ok, positions="picture", modality_map=batch.modality_map),
            "unknown position",
        ),
        "positions without map": (dict(neurons=ok, positions="image"), "needs modality_map="),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown module", "layer count", "index too large", "negative index", "float indices", "unknown mode",
        "mean without means", "mean of wrong shape", "constant without value", "unknown position",
        "positions without map",
    ],
)
def test_bad_input_raises_a_clear_error(model, batch, case):
    kwargs, message = _bad_inputs(model, batch)[case]
    with pytest.raises(ValueError, match=message):
        deactivation_hooks(model, **kwargs)


def test_a_deactivation_spec_builds_the_hooks_deactivation_hooks_builds(model, batch):
    from mm_lens.neurons.deactivation import Deactivation

    neurons = lm_neurons(model, {0: [1, 4], 1: [2]})
    spec = Deactivation(neurons, mode="constant", value=3.0, positions=("image", "last"))
    by_spec = model.run_with_hooks(batch, fwd_hooks=spec.hooks(model, batch.modality_map))
    direct = model.run_with_hooks(batch, fwd_hooks=deactivation_hooks(
        model, neurons, mode="constant", value=3.0, positions=("image", "last"), modality_map=batch.modality_map))
    assert torch.equal(by_spec, direct)
    assert not torch.equal(by_spec, model(batch))


def test_a_neuron_set_made_for_another_model_is_refused_naming_both_shapes(model, batch):
    from mm_lens.neurons.deactivation import check_neurons_fit
    from mm_lens.neurons.neuron_set import NeuronSet

    layers, width = model.cfg.n_layers, model.neuron_widths["lm_mlp"]
    fits = NeuronSet({"a": {"lm_mlp": [torch.tensor([1])] * layers}}, {"lm_mlp": width})
    check_neurons_fit(model, fits)
    wider = NeuronSet({"a": {"lm_mlp": [torch.tensor([1])] * layers}}, {"lm_mlp": 2 * width})
    with pytest.raises(ValueError, match=rf"lm_mlp is {layers} layers x {2 * width} neurons but this model's is {layers} x {width}"):
        deactivation_hooks(model, wider)
    deeper = NeuronSet({"a": {"lm_mlp": [torch.tensor([1])] * (layers + 2)}}, {"lm_mlp": width})
    with pytest.raises(ValueError, match=rf"{layers + 2} layers x {width} neurons but this model's is {layers} x {width}"):
        deactivation_hooks(model, deeper)
    with pytest.raises(ValueError, match="made for another model"):
        from mm_lens.analysis.evaluation import evaluate_cross_domain

        evaluate_cross_domain(model, [{"question": "what", "image": None, "answer": "a", "domain": "d"}], wider, progress=False)
