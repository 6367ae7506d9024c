"""notebooks/scaling_plots.ipynb runs headless on a small generated results directory and draws every figure."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from analysis import synthetic

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "scaling_plots.ipynb"


def test_scaling_plots_notebook_reproduces_the_figures_from_a_results_directory(tmp_path):
    table = synthetic.make_table({"cpu-s": 1.2e6, "cpu-m": 4.8e6, "cpu-l": 19e6}, seeds=2, stages=("pretrain",))
    synthetic.write_result_files(table, tmp_path / "results")
    # read as `sweep analyze` reads it: the grid's analysis: section, from the sweep's manifest
    (tmp_path / "results" / "manifest.json").write_text('{"runs": {}, "launches": [], "analysis": {"max_drop": 2.5}}')
    nb = nbformat.read(NOTEBOOK, as_version=4)
    [parameters] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert "RESULTS =" in parameters.source
    parameters.source += f"\nRESULTS = {str(tmp_path / 'results')!r}\nN_BOOT = 100\nOUT = {str(tmp_path / 'out')!r}\n"
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # accuracy, drop, inverse scaling law, accuracy against compute
    assert (tmp_path / "out" / "min_tokens.csv").exists()
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "runs (0 failed)" in text and "metric zeroshot_top1, tolerance 2.5 pp" in text
