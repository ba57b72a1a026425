import os
import shutil

import pytest
import torch

from prompt2prompt.families import FAMILIES
from prompt2prompt.testing import KINDS, tiny_pipeline

# the tiny pipelines the tests build, from the registry: adding a family adds its builder to testing.KINDS, not a list
UNETS = tuple(k for k in KINDS if not FAMILIES[k].joint)
MMDITS = tuple(k for k in KINDS if FAMILIES[k].joint)

THREADS = int(os.environ.get("P2P_TEST_THREADS", "2"))
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _threads():
    """Every test starts at the suite's thread count: the code under test may set torch's (the trainer's --threads,
    a sweep worker's), and more threads than free cores slows every later test many times over."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


def build_tiny(root, kinds) -> dict:
    """Tiny random pipelines of the kinds (`prompt2prompt.testing.tiny_pipeline`), progress bars off."""
    built = {}
    for kind in kinds:
        pipe = tiny_pipeline(kind, root / kind)
        pipe.set_progress_bar_config(disable=True)
        built[kind] = pipe
    return built


@pytest.fixture(scope="session")
def pipes(tmp_path_factory):
    """Tiny random UNet pipelines (SD 1.x, 2.x, XL), built once per test session."""
    return build_tiny(tmp_path_factory.mktemp("pipes"), UNETS)


@pytest.fixture(scope="session")
def joint_pipes(tmp_path_factory):
    """Tiny random MM-DiT pipelines (every joint family with a tiny builder), built once per test session."""
    return build_tiny(tmp_path_factory.mktemp("joint-pipes"), MMDITS)


@pytest.fixture(scope="session")
def sd1(pipes):
    return pipes["sd1"]


@pytest.fixture(scope="session")
def tokenizer(sd1):
    return sd1.tokenizer


@pytest.fixture(scope="session")
def sd1_folder(sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "tiny-sd1"
    sd1.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def shapes():
    """The bundled `shapes` pipeline, loaded once per test session (tests that change it put it back)."""
    from prompt2prompt.loading import BUNDLED, load_pipeline

    if not (BUNDLED["shapes"] / "model_index.json").exists():
        pytest.skip("the shapes model is not shipped yet: its training has not passed its bars")
    pipe = load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    return pipe


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if not BROWSER or sync_playwright is None:
        if os.environ.get("P2P_REQUIRE_BROWSER"):
            pytest.fail("P2P_REQUIRE_BROWSER is set but chromium or playwright is missing")
        pytest.skip("no chromium (apt-get install chromium) or no playwright")
    with sync_playwright() as p:
        # no network here: Chromium's background connections would only be refused
        b = p.chromium.launch(executable_path=BROWSER, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        yield b
        b.close()
