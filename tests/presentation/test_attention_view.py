"""The multimodal attention view: what it stores and where it puts each patch (in Python),
and what a person sees in a real browser (headless Chromium through selenium): hovering a
token paints the patch it attends to on the picture, hovering a patch colours the token it
attends to, the head menu switches between heads and their mean.

Attention is planted with a hook on ``blocks.1.attn.hook_pattern`` (most of one query's mass
on one chosen key), so the test knows where the heat must be."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from helpers import random_image
from mm_lens import HookedMLLM
from mm_lens.model.architectures.geometry import cell_extent
from mm_lens.presentation.attention_view import attention_view, pack_pattern, unpack_pattern
from mm_lens.presentation.report import HTMLReport, remote_references
from mm_lens.presentation.visualize import view_extent

LAYER = 1


@pytest.fixture(scope="module")
def any_model(models, tiny_folder):
    """``any_model(arch)``: the session's LLaVA models, or another tiny architecture loaded once."""
    loaded = dict(models)

    def get(arch: str) -> HookedMLLM:
        if arch not in loaded:
            loaded[arch] = HookedMLLM.from_pretrained(tiny_folder(arch))
        return loaded[arch]

    return get


def planted(query: int, key: int, heads: list[int] | None = None, weight: float = 0.9):
    """A hook on ``hook_pattern`` making ``query`` (batch row 0) put ``weight`` of its
    attention on ``key`` and spread the rest evenly over the keys it may see."""

    def hook(pattern, hook):
        pattern = pattern.clone()
        row = torch.zeros(pattern.shape[-1], dtype=pattern.dtype, device=pattern.device)
        row[: query + 1] = (1 - weight) / (query + 1)
        row[key] += weight
        for h in range(pattern.shape[1]) if heads is None else heads:
            pattern[0, h, query] = row
        return pattern

    return hook


def view_with(model, batch, pictures, query: int, key: int, heads: list[int] | None = None, **kwargs):
    name = f"blocks.{LAYER}.attn.hook_pattern"
    with model.hooks(fwd_hooks=[(name, planted(query, key, heads))]):
        return attention_view(model, batch, pictures, layers=[LAYER], **kwargs)


def last_index(view, label: str) -> int:
    return max(i for i, text in enumerate(view.labels) if text.strip() == label)


def panel_of(view, index: int):
    """The panel drawing position ``index`` and that cell's box."""
    for k, panel in enumerate(view.panels):
        for i, box in panel.cells:
            if i == index:
                return k, box
    raise AssertionError(f"position {index} is on no panel")


# ---- what the view stores ------------------------------------------------------------


def test_packed_attention_round_trips_within_a_quantisation_step():
    pattern = torch.softmax(torch.randn(12, 12) * 3, -1).tril()
    on_picture = torch.tensor([False] * 3 + [True] * 6 + [False] * 3)
    back = unpack_pattern(pack_pattern(pattern, on_picture), on_picture)
    stored = ~back.isnan()
    assert not stored[on_picture][:, on_picture].any()  # patch-to-patch is left out
    assert stored[~on_picture].all() and stored[:, ~on_picture].all()
    step = pattern.amax(-1, keepdim=True).expand_as(pattern) / 510
    assert torch.all((back[stored] - pattern[stored]).abs() <= step[stored] + 1e-7)


def test_view_holds_the_models_attention_of_the_chosen_heads_and_their_mean(models):
    model = models["llava_next"]
    picture = random_image(34, 60, 0)
    batch = model.prepare_inputs(["what is this"], [picture])
    view = attention_view(model, batch, [picture], layers=[0, 1], heads=[2])
    _, cache = model.run_with_cache(batch, names_filter=lambda name: name.endswith("attn.hook_pattern") and name.startswith("blocks."))
    assert set(view.blobs) == {(0, 2), (0, "mean"), (1, 2), (1, "mean")}
    for layer in (0, 1):
        full = cache[f"blocks.{layer}.attn.hook_pattern"][0].float()
        for head, expected in ((2, full[2]), ("mean", full.mean(0))):
            got = view.pattern(layer, head)
            stored = ~got.isnan()
            assert torch.allclose(got[stored], expected[stored], atol=expected.max().item() / 500)


def test_anyres_patches_lie_on_their_cells_of_both_views(models):
    model = models["llava_next"]
    picture = random_image(34, 60, 0)
    batch = model.prepare_inputs(["what is this"], [picture])
    view = attention_view(model, batch, [picture], layers=[LAYER])
    mm = batch.modality_map
    base, high = view.panels
    assert [len(base.cells), len(high.cells)] == [16, 32]  # 4x4 base view, 4x8 unpadded high-res grid
    assert len(high.tiles) == 4 and "high-resolution" in high.title
    for panel, view_index in ((base, 0), (high, 1)):
        extent = view_extent(model, (34, 60), view_index)
        for index, box in panel.cells:
            position = view.positions[index]
            assert (int(mm.tile[0, position]) >= 1) == (view_index == 1)
            left, right, bottom, top = cell_extent(extent, mm.grids[0][view_index], int(mm.row[0, position]), int(mm.col[0, position]))
            assert box == pytest.approx((left, top, right, bottom))
    newlines = [i for i, label in enumerate(view.labels) if label == "<img 0:nl>"]
    assert len(newlines) == 4 and not any(view.on_picture[i] for i in newlines)  # newlines stay in the token strip


def test_every_image_of_a_padded_row_gets_its_views(models):
    model = models["llava_next"]
    tall, square = random_image(60, 20, 1), random_image(40, 40, 2)
    batch = model.prepare_inputs(["what is this", "compare these two"], [random_image(34, 60, 0), [tall, square]])
    view = attention_view(model, batch, [tall, square], row=1, layers=[LAYER])
    assert [(panel.image, panel.picture) for panel in view.panels] == [(1, 0), (1, 0), (2, 1), (2, 1)]
    assert [len(panel.cells) for panel in view.panels] == [16, 16, 16, 64]  # tall: 8x2 kept of 2 tiles; square: 8x8
    assert view.picture_sizes == [(20, 60), (40, 40)]
    padded = int((batch["attention_mask"][0] == 0).sum())
    short = attention_view(model, batch, random_image(34, 60, 0), row=0, layers=[LAYER])
    assert short.positions[0] == padded and len(short.labels) == batch["input_ids"].shape[1] - padded


def test_qwen2_vl_grid_covers_the_whole_picture(any_model):
    model = any_model("qwen2_vl")
    picture = random_image(32, 48, 0)
    batch = model.prepare_inputs(["what is this"], [picture])
    (panel,) = attention_view(model, batch, [picture], layers=[LAYER]).panels
    boxes = torch.tensor([box for _, box in panel.cells])
    assert len(panel.cells) == 4 * 6
    assert boxes[:, :2].amin(0).tolist() == [0, 0] and boxes[:, 2:].amax(0).tolist() == [48, 32]


@pytest.mark.parametrize("arch, kind", [("instructblip", "query"), ("qwen2_audio", "audio")])
def test_media_without_a_place_on_a_picture_is_token_to_token_and_says_so(any_model, arch, kind):
    model = any_model(arch)
    if kind == "audio":
        batch = model.prepare_inputs(["what is this"], None, audios=[torch.zeros(1600).numpy()])
    else:
        batch = model.prepare_inputs(["what is this"], [random_image(28, 28, 0)])
    view = attention_view(model, batch, layers=[LAYER])  # no pictures needed
    assert not any(view.on_picture) and all(not panel.cells for panel in view.panels)
    assert any(label.startswith(f"<{kind} 0:") for label in view.labels)
    assert any("token-to-token attention only" in note for note in view.notes)
    assert not view.pattern(LAYER, 0).isnan().any()  # the whole matrix is stored
    assert "token-to-token attention only" in view.to_html()


def test_pages_reference_nothing_remote(models, tmp_path):
    model = models["llava_next"]
    picture = random_image(34, 60, 0)
    batch = model.prepare_inputs(["</script><script src='https://x.js'>"], [picture])
    view = attention_view(model, batch, [picture], layers=[LAYER], title="<b>https://unpkg.com</b>")
    page = view.save(tmp_path / "view.html").read_text()
    assert remote_references(page) == [] and "<script src" not in page
    assert view._repr_html_() == view.to_html()
    report = HTMLReport("views").add_view(view)
    assert view.to_html() in report.to_html() and remote_references(report.to_html()) == []


def test_refusals_say_what_to_pass(models):
    model = models["llava_next"]
    picture = random_image(34, 60, 0)
    batch = model.prepare_inputs(["what is this"], [picture])
    with pytest.raises(ValueError, match="pass the pictures the batch was built from as images="):
        attention_view(model, batch, layers=[LAYER])
    with pytest.raises(ValueError, match="1 image.* but 2 picture"):
        attention_view(model, batch, [picture, picture], layers=[LAYER])
    with pytest.raises(ValueError, match="pass the pictures the batch was built from"):
        attention_view(model, batch, [random_image(40, 40, 0)], layers=[LAYER])
    with pytest.raises(ValueError, match="pass fewer layers= or heads="):
        attention_view(model, batch, [picture], max_megabytes=0.001)
    with pytest.raises(ValueError, match="layers must name"):
        attention_view(model, batch, [picture], layers=[7])


# ---- in a browser ----------------------------------------------------------------------


def open_page(driver, path, views: int = 1):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(path.resolve().as_uri())
    ready = "return Array.from(document.querySelectorAll('.mmav')).filter(e => e.dataset.ready === '1').length"
    WebDriverWait(driver, 20).until(lambda d: d.execute_script(ready) == views)
    return driver.find_elements("css selector", ".mmav")


def wait_ready(driver, root):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(lambda d: root.get_attribute("data-ready") == "1")


def hover(driver, element, dx: float | None = None, dy: float | None = None):
    from selenium.webdriver.common.action_chains import ActionChains

    actions = ActionChains(driver)
    if dx is None:
        actions.move_to_element(element)
    else:  # offsets from the element's centre
        actions.move_to_element_with_offset(element, int(round(dx)), int(round(dy)))
    actions.perform()


def pixels(driver, canvas, points: list[tuple[float, float]]) -> list[tuple[int, int, int]]:
    """Canvas pixels at CSS-pixel points, as the page drew them."""
    return [
        tuple(rgba[:3])
        for rgba in driver.execute_script(
            "const c = arguments[0], d = window.devicePixelRatio || 1, ctx = c.getContext('2d');"
            "return arguments[1].map(p => Array.from(ctx.getImageData(Math.floor(p[0] * d), Math.floor(p[1] * d), 1, 1).data));",
            canvas,
            [list(p) for p in points],
        )
    ]


def redness(rgb) -> float:
    return rgb[0] - (rgb[1] + rgb[2]) / 2


def token_heat(driver, root) -> dict[str, float]:
    """Alpha of each token's red background, by label (last occurrence wins)."""
    heat = {}
    for span in root.find_elements("css selector", ".mmav-tok"):
        background = driver.execute_script("return getComputedStyle(arguments[0]).backgroundColor", span)
        values = [float(v) for v in re.findall(r"[\d.]+", background)]
        heat[span.text.strip()] = values[3] if len(values) == 4 else (1.0 if values and values[0] > 0 else 0.0)
    return heat


def cell_pixels(driver, root, view) -> dict[int, tuple[int, int, int]]:
    """The pixel at the centre of every cell of every panel, by position index."""
    canvases = root.find_elements("css selector", ".mmav-panel canvas")
    out = {}
    for panel, canvas in zip(view.panels, canvases):
        indices = [i for i, _ in panel.cells]
        for i, rgb in zip(indices, pixels(driver, canvas, [panel.canvas_point(box) for _, box in panel.cells])):
            out[i] = rgb
    return out


PICTURES = {"llava": (28, 28), "llava_next": (34, 60), "qwen2_vl": (32, 48)}


def grey(size: tuple[int, int]) -> Image.Image:
    """A plain grey picture (height, width): no red in it before the view paints."""
    return Image.new("RGB", (size[1], size[0]), (90, 90, 90))


# Qwen2-VL warns that its output ignores the planted pattern; the view reads it all the same
@pytest.mark.filterwarnings("ignore:A hook on self_attn.hook_pattern returned a modified tensor")
@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_vl"])
def test_hovering_a_token_paints_the_patch_it_attends_to(any_model, browser, tmp_path, arch):
    model = any_model(arch)
    picture = grey(PICTURES[arch])
    batch = model.prepare_inputs(["what is this"], [picture])
    probe = attention_view(model, batch, [picture], layers=[LAYER])
    query = last_index(probe, "this")
    patches = [i for i, on in enumerate(probe.on_picture) if on]
    key = patches[-3]  # for llava_next a high-resolution patch in the last tile
    view = view_with(model, batch, [picture], query, key)
    (root,) = open_page(browser, view.save(tmp_path / "view.html"))
    before = cell_pixels(browser, root, view)
    token = root.find_elements("css selector", ".mmav-tok")[[i for i, on in enumerate(view.on_picture) if not on].index(query)]
    hover(browser, token)
    after = cell_pixels(browser, root, view)
    hottest = max(after, key=lambda i: redness(after[i]))
    assert hottest == key
    assert redness(after[key]) > redness(before[key]) + 100
    assert all(redness(after[key]) > redness(rgb) + 100 for i, rgb in after.items() if i != key)
    assert "this" in root.find_element("css selector", ".mmav-info").text


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_hovering_a_patch_colours_the_token_it_attends_to(any_model, browser, tmp_path, arch):
    model = any_model(arch)
    picture = grey(PICTURES[arch])
    batch = model.prepare_inputs(["what is this"], [picture])
    probe = attention_view(model, batch, [picture], layers=[LAYER])
    user = [i for i, label in enumerate(probe.labels) if label.strip() == "USER"][0]
    query = [i for i, on in enumerate(probe.on_picture) if on][-1]  # last patch (high-res for llava_next)
    view = view_with(model, batch, [picture], query, user)
    (root,) = open_page(browser, view.save(tmp_path / "view.html"))
    assert max(token_heat(browser, root).values()) == 0  # nothing coloured before a hover
    k, box = panel_of(view, query)
    canvas = root.find_elements("css selector", ".mmav-panel canvas")[k]
    x, y = view.panels[k].canvas_point(box)
    size = browser.execute_script("return [arguments[0].clientWidth, arguments[0].clientHeight]", canvas)
    hover(browser, canvas, x - size[0] / 2, y - size[1] / 2)
    heat = token_heat(browser, root)
    assert heat["USER"] > 0.8 and all(value < 0.2 for label, value in heat.items() if label != "USER")
    assert view.labels[query] in root.find_element("css selector", ".mmav-info").text


def test_head_menu_switches_between_one_head_and_the_mean(models, browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    model = models["llava_next"]
    picture = grey((34, 60))
    batch = model.prepare_inputs(["what is this"], [picture])
    probe = attention_view(model, batch, [picture], layers=[LAYER])
    query, key = last_index(probe, "this"), [i for i, on in enumerate(probe.on_picture) if on][5]
    view = view_with(model, batch, [picture], query, key, heads=[2])  # only head 2 attends to the patch
    (root,) = open_page(browser, view.save(tmp_path / "view.html"))
    token = [t for t in root.find_elements("css selector", ".mmav-tok") if t.text.strip() == "this"][-1]
    token.click()  # pin the token so the menus can be used
    heads = Select(root.find_element("css selector", "select.mmav-head"))
    hottest = {}
    for choice in ("mean", "0", "2"):
        heads.select_by_value(choice)
        wait_ready(browser, root)
        after = cell_pixels(browser, root, view)
        hottest[choice] = max(after, key=lambda i: redness(after[i]))
        assert ("mean of heads" in root.find_element("css selector", ".mmav-info").text) == (choice == "mean")
    assert hottest["mean"] == key and hottest["2"] == key and hottest["0"] != key


def test_attended_by_mode_paints_the_patches_reading_a_token(models, browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    model = models["llava_next"]
    picture = grey((34, 60))
    batch = model.prepare_inputs(["what is this"], [picture])
    probe = attention_view(model, batch, [picture], layers=[LAYER])
    user = [i for i, label in enumerate(probe.labels) if label.strip() == "USER"][0]
    query = [i for i, on in enumerate(probe.on_picture) if on][7]
    view = view_with(model, batch, [picture], query, user)
    (root,) = open_page(browser, view.save(tmp_path / "view.html"))
    Select(root.find_element("css selector", "select.mmav-mode")).select_by_value("key")
    hover(browser, [t for t in root.find_elements("css selector", ".mmav-tok") if t.text.strip() == "USER"][0])
    after = cell_pixels(browser, root, view)
    assert max(after, key=lambda i: redness(after[i])) == query


def test_instructblip_view_colours_query_tokens_and_shows_the_note(any_model, browser, tmp_path):
    model = any_model("instructblip")
    picture = random_image(28, 28, 0)
    batch = model.prepare_inputs(["what is this"], [picture])
    probe = attention_view(model, batch, [picture], layers=[LAYER])
    query, key = last_index(probe, "this"), probe.labels.index("<query 0:5>")
    view = view_with(model, batch, [picture], query, key)
    (root,) = open_page(browser, view.save(tmp_path / "view.html"))
    assert "token-to-token attention only" in root.find_element("css selector", ".mmav-note").text
    hover(browser, [t for t in root.find_elements("css selector", ".mmav-tok") if t.text.strip() == "this"][-1])
    heat = token_heat(browser, root)
    assert heat["<query 0:5>"] > 0.8 and all(value < 0.2 for label, value in heat.items() if label != "<query 0:5>")


def test_two_views_in_one_report_work_independently(models, browser, tmp_path):
    pictures = {"llava": grey((28, 28)), "llava_next": grey((34, 60))}
    report = HTMLReport("two views")
    views = []
    for arch, picture in pictures.items():
        model = models[arch]
        batch = model.prepare_inputs(["what is this"], [picture])
        probe = attention_view(model, batch, [picture], layers=[LAYER])
        key = [i for i, on in enumerate(probe.on_picture) if on][2]
        views.append(view_with(model, batch, [picture], last_index(probe, "this"), key))
        report.add_view(views[-1])
    roots = open_page(browser, report.save(tmp_path / "report.html"), views=2)
    second, view = roots[1], views[1]
    first_before = cell_pixels(browser, roots[0], views[0])
    hover(browser, [t for t in second.find_elements("css selector", ".mmav-tok") if t.text.strip() == "this"][-1])
    after = cell_pixels(browser, second, view)
    key = max(after, key=lambda i: redness(after[i]))
    assert view.labels[key] == view.labels[[i for i, on in enumerate(view.on_picture) if on][2]]
    assert redness(after[key]) > 100
    assert cell_pixels(browser, roots[0], views[0]) == first_before  # the first view is untouched
