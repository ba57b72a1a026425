import os

import pytest
import torch

from prompt2prompt.testing import tiny_pipeline

torch.set_num_threads(int(os.environ.get("P2P_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def pipes(tmp_path_factory):
    """Tiny random SD 1.x, 2.x and XL pipelines, built once per test session."""
    root = tmp_path_factory.mktemp("pipes")
    built = {}
    for kind in ("sd1", "sd2", "sdxl"):
        pipe = tiny_pipeline(kind, root / kind)
        pipe.set_progress_bar_config(disable=True)
        built[kind] = pipe
    return built


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
