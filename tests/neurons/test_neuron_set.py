"""NeuronSet: construction, validation, counts, set algebra, controls, files and plots."""

from __future__ import annotations

import json

import pytest
import torch

from mm_lens.neurons.neuron_set import NeuronSet
from mm_lens.neurons.lape import lape_select
from mm_lens.neurons.miner import miner_select


def t(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


@pytest.fixture
def hand_made() -> NeuronSet:
    """Two modules (3 layers x 8, 1 layer x 4) and three groups with some shared neurons."""
    neurons = {
        "driving": {"lm_mlp": [t(0, 2), t(), t(5, 7)], "projector": [t(1)]},
        "medical": {"lm_mlp": [t(2, 3), t(4), t(7)], "projector": [t(1, 3)]},
        "docs": {"lm_mlp": [t(), t(), t()], "projector": [t(0)]},
    }
    return NeuronSet(neurons, {"lm_mlp": 8, "projector": 4}, {"model": "tiny"})


def as_set(ns: NeuronSet, group: str, module: str | None = None) -> set[tuple]:
    modules = ns.modules if module is None else [module]
    return {
        (m, layer, int(i))
        for m in modules
        for layer, idx in enumerate(ns.neurons[group][m])
        for i in idx
    }


# ---- construction ---------------------------------------------------------------------


def test_from_lape_keeps_every_domain_module_and_layer_of_lape_select():
    gen = torch.Generator().manual_seed(0)
    over_zero = torch.randint(0, 100, (3, 50, 4), generator=gen)
    n_tokens = torch.full((4,), 100)
    lm = lape_select(over_zero, n_tokens, top_rate=0.1)
    proj = lape_select(over_zero[:1, :20], n_tokens, top_rate=0.2)
    groups = ["driving", "medical", "remote sensing", "docs"]
    widths = {"lm_mlp": 50, "projector": 20}
    ns = NeuronSet.from_lape({"lm_mlp": lm, "projector": proj}, groups, widths)
    assert ns.groups == groups
    assert ns.modules == ["lm_mlp", "projector"]
    assert ns.n_layers("lm_mlp") == 3 and ns.n_layers("projector") == 1
    for d, g in enumerate(groups):
        for layer in range(3):
            assert torch.equal(ns.neurons[g]["lm_mlp"][layer], lm[d][layer])
        assert torch.equal(ns.neurons[g]["projector"][0], proj[d][0])
    assert ns.metadata["method"] == "lape"


def test_from_lape_rejects_a_domain_count_that_differs_from_the_groups():
    result = [[t(1)], [t(2)]]
    with pytest.raises(ValueError, match="2 domains but 3 groups"):
        NeuronSet.from_lape({"lm_mlp": result}, ["a", "b", "c"], {"lm_mlp": 4})


def test_from_pairs_splits_miner_pairs_by_layer():
    scores = torch.rand(2, 4, 30, generator=torch.Generator().manual_seed(1))
    pairs = miner_select(scores, ["text", "image"], ratio=0.1)
    ns = NeuronSet.from_pairs(pairs, "lm_mlp", n_layers=4, width=30, metadata={"ratio": 0.1})
    assert ns.groups == ["text", "image"] and ns.modules == ["lm_mlp"]
    assert ns.widths == {"lm_mlp": 30} and ns.n_layers("lm_mlp") == 4
    for g, p in pairs.items():
        assert as_set(ns, g) == {("lm_mlp", int(l), int(n)) for l, n in p}
        assert ns.count(g) == p.shape[0]
    assert ns.metadata == {"method": "miner", "ratio": 0.1}


def test_from_pairs_accepts_unordered_pairs_and_empty_groups():
    pairs = {
        "text": t(2, 5, 0, 3, 2, 1).reshape(3, 2),
        "audio": torch.zeros(0, 2, dtype=torch.long),
    }
    ns = NeuronSet.from_pairs(pairs, "lm_mlp", n_layers=3, width=6)
    assert [x.tolist() for x in ns.neurons["text"]["lm_mlp"]] == [[3], [], [1, 5]]
    assert ns.count("audio") == 0


def test_from_pairs_rejects_a_layer_outside_the_module():
    with pytest.raises(ValueError, match="layer 3 but module 'lm_mlp' has 3 layers"):
        NeuronSet.from_pairs({"text": t(3, 0).reshape(1, 2)}, "lm_mlp", n_layers=3, width=6)


def test_indices_are_stored_as_int64_on_cpu():
    ns = NeuronSet({"a": {"m": [torch.tensor([1, 2], dtype=torch.int32)]}}, {"m": 4})
    assert ns.neurons["a"]["m"][0].dtype == torch.long


# ---- validation -----------------------------------------------------------------------


def test_unsorted_indices_raise_naming_group_module_and_layer():
    neurons = {"a": {"m": [t(0), t(3, 1)]}}
    with pytest.raises(ValueError, match=r"group 'a', module 'm', layer 1: .*not sorted"):
        NeuronSet(neurons, {"m": 4})


def test_duplicate_indices_raise_naming_the_neuron():
    with pytest.raises(ValueError, match=r"layer 0: neuron 2 appears more than once"):
        NeuronSet({"a": {"m": [t(1, 2, 2)]}}, {"m": 4})


def test_index_at_or_above_width_raises_with_the_valid_range():
    with pytest.raises(ValueError, match=r"neuron 4 is out of range.*\[0, 4\)"):
        NeuronSet({"a": {"m": [t(0, 4)]}}, {"m": 4})


def test_negative_index_raises():
    with pytest.raises(ValueError, match="neuron -1 is out of range"):
        NeuronSet({"a": {"m": [t(-1, 2)]}}, {"m": 4})


def test_groups_with_different_layer_counts_raise():
    neurons = {"a": {"m": [t(0), t(1)]}, "b": {"m": [t(0)]}}
    with pytest.raises(ValueError, match="group 'b', module 'm' has 1 layers but group 'a' has 2"):
        NeuronSet(neurons, {"m": 4})


def test_groups_with_different_modules_raise():
    neurons = {"a": {"m": [t(0)]}, "b": {"other": [t(0)]}}
    with pytest.raises(ValueError, match=r"group 'b' has modules \['other'\] but widths has"):
        NeuronSet(neurons, {"m": 4})


def test_float_indices_raise():
    with pytest.raises(ValueError, match="integer tensor"):
        NeuronSet({"a": {"m": [torch.tensor([1.0])]}}, {"m": 4})


def test_metadata_that_is_not_json_raises():
    with pytest.raises(ValueError, match="metadata is not JSON-able"):
        NeuronSet({"a": {"m": [t(0)]}}, {"m": 4}, {"scores": torch.zeros(2)})


# ---- counts and table -------------------------------------------------------------------


def test_counts_are_per_group_and_layer(hand_made):
    assert hand_made.counts("lm_mlp").tolist() == [[2, 0, 2], [2, 1, 1], [0, 0, 0]]
    assert hand_made.counts("projector").tolist() == [[1], [2], [1]]


def test_count_of_a_group_sums_its_modules_and_layers(hand_made):
    assert hand_made.count("driving") == 5
    assert hand_made.count("medical", "lm_mlp") == 4


def test_count_without_group_counts_shared_neurons_once(hand_made):
    expected = set().union(*(as_set(hand_made, g) for g in hand_made.groups))
    assert hand_made.count() == len(expected) == 9
    assert hand_made.count(module="projector") == 3


def test_table_shows_totals_and_per_layer_counts(hand_made):
    text = hand_made.table()
    lines = text.splitlines()
    summary = next(line for line in lines if line.startswith("medical"))
    assert summary.split() == ["medical", "4", "2", "6"]
    lm_block = lines[lines.index("lm_mlp: 3 layers x 8 neurons") + 1 :]
    assert lm_block[0].split() == ["group", "total", "L0", "L1", "L2"]
    assert lm_block[1].split() == ["driving", "4", "2", "0", "2"]
    union_row = next(line for line in lm_block if line.startswith("(any group)"))
    assert union_row.split()[2:] == ["6", "3", "1", "2"]


def test_records_have_one_entry_per_group_module_and_layer(hand_made):
    records = hand_made.records()
    assert len(records) == 3 * (3 + 1)
    assert {"group": "medical", "module": "lm_mlp", "layer": 1, "count": 1, "width": 8} in records
    json.dumps(records)


# ---- set algebra ------------------------------------------------------------------------


def test_overlap_equals_direct_set_intersections(hand_made):
    for module in (None, "lm_mlp", "projector"):
        overlap = hand_made.overlap(module)
        for i, a in enumerate(hand_made.groups):
            for j, b in enumerate(hand_made.groups):
                expected = len(as_set(hand_made, a, module) & as_set(hand_made, b, module))
                assert overlap[i, j] == expected
    assert hand_made.overlap().tolist() == [[5, 3, 0], [3, 6, 0], [0, 0, 1]]


def test_jaccard_is_intersection_over_union_and_one_for_two_empty_sets(hand_made):
    j = hand_made.jaccard()
    assert j[0, 1].item() == pytest.approx(3 / (5 + 6 - 3))
    assert j[2, 2].item() == 1.0 and j[0, 2].item() == 0.0
    assert hand_made.jaccard("lm_mlp")[2, 2].item() == 1.0  # docs has no lm_mlp neurons


def test_union_merges_groups_per_module_and_layer(hand_made):
    union = hand_made.union()
    assert [x.tolist() for x in union["lm_mlp"]] == [[0, 2, 3], [4], [5, 7]]
    assert [x.tolist() for x in union["projector"]] == [[0, 1, 3]]
    only = hand_made.union(["docs"])
    assert [x.tolist() for x in only["projector"]] == [[0]]


def test_complement_is_exactly_the_unchosen_neurons(hand_made):
    comp = hand_made.complement("driving")
    for m in hand_made.modules:
        for layer, chosen in enumerate(hand_made.neurons["driving"][m]):
            expected = sorted(set(range(hand_made.widths[m])) - set(chosen.tolist()))
            assert comp[m][layer].tolist() == expected


# ---- random control ---------------------------------------------------------------------


def test_random_control_matches_counts_per_group_module_and_layer(hand_made):
    control = hand_made.random_control(seed=0)
    assert control.groups == hand_made.groups and control.widths == hand_made.widths
    for m in hand_made.modules:
        assert torch.equal(control.counts(m), hand_made.counts(m))


def test_random_control_is_disjoint_from_the_groups_own_neurons(hand_made):
    for seed in range(5):
        control = hand_made.random_control(seed=seed)
        for g in hand_made.groups:
            assert not as_set(control, g) & as_set(hand_made, g)


def test_random_control_is_deterministic_per_seed_and_differs_across_seeds():
    neurons = {"a": {"m": [torch.arange(0, 100, 10)]}, "b": {"m": [torch.arange(5)]}}
    ns = NeuronSet(neurons, {"m": 1000})
    assert ns.random_control(seed=3) == ns.random_control(seed=3)
    assert ns.random_control(seed=3) != ns.random_control(seed=4)


def test_random_control_records_its_seed_and_source(hand_made):
    control = hand_made.random_control(seed=7)
    assert control.metadata["method"] == "random_control"
    assert control.metadata["seed"] == 7
    assert control.metadata["source"] == {"model": "tiny"}


def test_random_control_raises_when_too_few_other_neurons_remain():
    ns = NeuronSet({"a": {"m": [t(0), t(0, 1, 2)]}}, {"m": 5})
    with pytest.raises(ValueError, match=r"group 'a', module 'm', layer 1: .*only 2 others"):
        ns.random_control(seed=0)
    assert ns.random_control(seed=0, exclude_selected=False).counts("m").tolist() == [[1, 3]]


# ---- files ------------------------------------------------------------------------------


def test_save_and_load_round_trip_with_empty_layers_and_odd_names(tmp_path):
    neurons = {
        "remote/sensing.v2": {"vision mlp/0": [t(), t(3)], "lm.mlp": [t(1, 2)]},
        "a b": {"vision mlp/0": [t(0, 5), t()], "lm.mlp": [t()]},
    }
    ns = NeuronSet(neurons, {"vision mlp/0": 6, "lm.mlp": 3}, {"model": "tiny", "top_rate": 0.01})
    ns.save(tmp_path / "set")
    loaded = NeuronSet.load(tmp_path / "set")
    assert loaded == ns
    assert loaded.groups == ns.groups and loaded.modules == ns.modules
    assert loaded.neurons["a b"]["vision mlp/0"][1].dtype == torch.long


def test_save_adds_library_versions_to_the_metadata(tmp_path, hand_made):
    hand_made.save(tmp_path)
    meta = NeuronSet.load(tmp_path).metadata
    assert meta["model"] == "tiny"
    assert set(meta["versions"]) == {"mm_lens", "torch", "transformers", "transformer_lens"}
    assert meta["versions"]["torch"] == torch.__version__
    header = json.loads((tmp_path / "neurons.json").read_text())
    assert header["n_layers"] == {"lm_mlp": 3, "projector": 1}


def test_save_leaves_no_temporary_files(tmp_path, hand_made):
    hand_made.save(tmp_path)
    hand_made.save(tmp_path, overwrite=True)  # replaced in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neurons.json", "neurons.safetensors"]


def test_saving_over_an_existing_set_needs_overwrite(tmp_path, hand_made):
    hand_made.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="neurons.safetensors exists; pass overwrite=True"):
        hand_made.save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_load_of_a_folder_without_files_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="neurons.json"):
        NeuronSet.load(tmp_path)


def test_equality_ignores_metadata_but_not_indices(hand_made):
    same = NeuronSet(hand_made.neurons, hand_made.widths, {"other": 1})
    assert same == hand_made
    changed = {g: dict(per) for g, per in hand_made.neurons.items()}
    changed["docs"]["projector"] = [t(2)]
    assert NeuronSet(changed, hand_made.widths) != hand_made


# ---- plots ------------------------------------------------------------------------------


def test_plot_layers_draws_one_line_per_group(hand_made):
    from matplotlib.figure import Figure

    fig = hand_made.plot_layers("lm_mlp")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == hand_made.groups
    assert list(ax.lines[1].get_ydata()) == [2, 1, 1]


def test_plot_layers_as_bars_draws_one_bar_per_group_and_layer(hand_made):
    ax = hand_made.plot_layers("lm_mlp", kind="bar").axes[0]
    assert len(ax.containers) == 3
    assert all(len(bars) == 3 for bars in ax.containers)


def test_plot_overlap_annotates_every_cell(hand_made):
    fig = hand_made.plot_overlap()
    ax = fig.axes[0]
    assert len(ax.images) == 1
    assert [text.get_text() for text in ax.texts] == ["5", "3", "0", "3", "6", "0", "0", "0", "1"]


def test_plot_draws_into_a_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    ns = NeuronSet({"a": {"m": [t(0)]}}, {"m": 2})
    assert ns.plot_layers("m", ax=ax) is fig
