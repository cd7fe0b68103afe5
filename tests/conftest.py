"""Session fixtures: tiny random models saved offline (LLaVA-1.5 and LLaVA-NeXT for every
analysis test; the other architectures for their own tests in tests/architectures), and
images. Shared test data and references live in ``helpers.py``."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Every annotation in mm_lens, jaxtyping's shapes and dtypes included, is checked while the
# tests run: the import hook wraps each function and dataclass of the package in
# ``helpers.typechecker`` (beartype), so a wrong shape or dtype, in the code or in its
# annotation, fails a test. It must come before anything imports mm_lens: a module imported
# earlier is not checked. (tests/base/test_checked_shapes.py shows the hook is on.)
import jaxtyping

jaxtyping.install_import_hook("mm_lens", "helpers.typechecker")

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from helpers import random_image
from mm_lens import HookedMLLM
from mm_lens.model.tiny import TINY_BUILDERS

ARCHS = ("llava", "llava_next")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """``tiny_folder(name)``: the folder of the tiny model ``name`` of ``TINY_BUILDERS``,
    built on first use."""
    root, built = tmp_path_factory.mktemp("tiny_models"), {}

    def folder(name: str) -> str:
        if name not in built:
            built[name] = str(TINY_BUILDERS[name](root / name))
        return built[name]

    return folder


@pytest.fixture(scope="session")
def model_folders(tiny_folder) -> dict[str, str]:
    """The LLaVA-1.5 and LLaVA-NeXT folders every analysis test runs on."""
    return {arch: tiny_folder(arch) for arch in ARCHS}


@pytest.fixture(scope="session", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def models(model_folders) -> dict[str, HookedMLLM]:
    return {arch: HookedMLLM.from_pretrained(folder) for arch, folder in model_folders.items()}


@pytest.fixture(scope="session")
def model(models, arch) -> HookedMLLM:
    return models[arch]


@pytest.fixture(scope="session")
def hf_reference(model_folders, arch):
    """An untouched HF model of the same folder (the bridge rewires its own copy)."""
    return AutoModelForImageTextToText.from_pretrained(model_folders[arch], attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Images of different sizes and aspect ratios (anyres picks different tilings)."""
    return [random_image(30, 50, 0), random_image(60, 20, 1), random_image(40, 40, 2)]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by selenium through Debian's chromedriver (no download)."""
    chromium = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    missing = [what for what, found in (("chromium", chromium), ("chromedriver", driver_path), ("selenium", webdriver)) if not found]
    if missing:
        reason = f"no headless browser ({', '.join(missing)} missing): apt-get install chromium chromium-driver; pip install -e '.[dev]'"
        if os.environ.get("CI"):
            pytest.fail(reason + " (.ci/run installs them)")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    arguments = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")
    for argument in (*arguments, "--window-size=1200,1000", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    yield driver
    driver.quit()
