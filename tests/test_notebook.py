"""notebooks/makemore_part3.ipynb runs top to bottom (as a reader runs it), and shows what it says it shows."""

from __future__ import annotations

import math
import os

import pytest

from tests.conftest import ROOT

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")


@pytest.mark.slow
def test_the_lecture_notebook_runs_top_to_bottom(names_file, monkeypatch):
    monkeypatch.setenv("MM_LIGHTNING_NAMES", str(names_file))
    path = ROOT / "notebooks" / "makemore_part3.ipynb"
    notebook = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), "committed with stale outputs"
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert f"ln(27) = {math.log(27):.4f}" in text
    assert "Warning" not in text and "Seed set" not in text, text  # what a reader sees: no noise
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith(("deep_", "original "))}
    assert float(lines["original"].split("step 0:")[1].split()[0]) > 20  # confidently wrong at init, as in the lecture
    assert "saturation" in lines["deep_nobn_gain3"] and lines["deep_bn_gain3"].endswith("healthy")
    # the notebook-exact run: the lecture notebook's cells 14-16, as printed there, the gradient stds up to float32
    # rounding of a std over a (32, 100) batch (the last digit is the CPU's kernels': docs/notebook-exact.md)
    assert "loss at step 0: 3.2870" in text
    rows = [line for line in text.splitlines() if "   gradient std " in line]
    assert [row.split("saturated: ")[1].split("%")[0] for row in rows] == ["2.78", "2.56", "2.25", "1.69", "1.88"]
    printed = [2.640702e-03, 2.245584e-03, 2.045742e-03, 1.983134e-03, 1.952382e-03]
    for row, std in zip(rows, printed, strict=True):
        assert abs(float(row.split("gradient std ")[1]) - std) <= 0.5e-9 + 1.9e-6 * std, row
    html = [o for c in code for o in c.outputs if "text/html" in o.get("data", {})]
    assert len(html) == 2 and "<table>" in html[0]["data"]["text/html"]  # the lecture's tables, as tables
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # the four figures, inline
    assert os.environ["MM_LIGHTNING_NAMES"] == str(names_file)
