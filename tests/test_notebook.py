"""notebooks/quickstart.ipynb runs top to bottom on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_notebook_executes():
    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / "quickstart.ipynb"
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = "".join(
        out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
    )
    assert "'kept': 6" in outputs
    assert "llamacpp {'in': 6, 'answered': 6" in outputs
    assert "capital ->" in outputs and "Paris" in outputs
