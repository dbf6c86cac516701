"""notebooks/colab_quickstart.ipynb executes top to bottom with its tiny settings (so it cannot rot)."""

from __future__ import annotations

import json

import pytest

from train_helpers import REPO

NOTEBOOK = REPO / "notebooks" / "colab_quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MINICPM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("MINICPM_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports this checkout's minicpm_jax
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()

    out = tmp_path / "out"
    fit = json.loads((out / "fit" / "scaling_fit.json").read_text())
    assert fit["fit"]["num_points"] == 6  # 2 widths × (a WSD run + 2 decay branches)
    # 1 width × 2 lrs in the tiny settings
    assert len((out / "lr_sweep" / "results.jsonl").read_text().splitlines()) == 2
    for png in ("wsd_curves.png", "lr_sweep/lr_transfer.png", "fit/scaling_fit.png"):
        assert (out / png).stat().st_size > 10_000, png
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    difference = float(outputs.split("max |logit difference| after the HF round trip:")[1].split()[0])
    assert difference < 1e-4
