"""examples/tour.ipynb runs top to bottom in a real kernel, and its results show as pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "tour.ipynb"


def test_the_notebook_is_kept_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c["cell_type"] == "code")


@pytest.mark.once
def test_the_tour_runs_and_shows_pictures(tmp_path, monkeypatch):
    import os

    # the kernel takes the tests' thread count (an oversubscribed kernel beside other work slows down many times)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("P2P_TEST_THREADS", "2"))
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    pictures = [c for c in code if any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert len(pictures) == len(code) - 1  # every cell but the set-up ends in a result shown as a picture
    texts = [o["data"]["text/plain"] for c in pictures for o in c.outputs if "text/plain" in o.get("data", {})]
    assert all("\n" not in t for t in texts if t.startswith(("AttendResult", "EditResult", "SwapAnalysis")))
