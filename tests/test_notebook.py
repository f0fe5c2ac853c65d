"""notebooks/quickstart.ipynb executes top to bottom without error (nbclient, kernel python3).

The kernel inherits this process's environment (the JAX persistent compilation cache and XLA flags of conftest),
and QUICKSTART_PLOT_PATH sends the TTFT plot to this test's temporary directory. The kernel spec `python3` must
exist (`python -m ipykernel install --user` registers it where ipykernel's own is missing).

The notebook is committed with its outputs, so a reader sees the results without running it; a second test checks
that they are there.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import NoSuchKernel

    plot = tmp_path / "ttft.png"
    monkeypatch.setenv("QUICKSTART_PLOT_PATH", str(plot))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except NoSuchKernel as e:
        pytest.fail(f"no 'python3' Jupyter kernel ({e}); register one with `python -m ipykernel install --user`")
    wall = time.perf_counter() - t0
    text = ""
    images = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
            if out.get("output_type") == "stream":
                text += out.get("text", "")
            images += "image/png" in out.get("data", {})
    assert "greedy tokens equal: True" in text
    assert "ledger equal to before: True | committed K/V unchanged: True" in text
    assert "max relative error" in text
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert images >= 1  # the plot is shown inline
    print(f"notebook executed in {wall:.1f} s")


def test_quickstart_notebook_is_committed_with_its_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("outputs") for c in code), "run the notebook and save it with its outputs"
    assert all(c.get("execution_count") for c in code)
    outputs = [o for c in code for o in c.outputs]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot
