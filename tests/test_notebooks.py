"""The notebooks run top to bottom (smoke mode) in a fresh kernel."""
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(name, **parameters):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    params = next(c for c in nb.cells if c.cell_type == "code" and "smoke" in c.source)
    params.source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    env_backup = dict(os.environ)
    os.environ.update(MPLBACKEND="Agg", XLA_FLAGS="", JAX_PLATFORMS="cpu")
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    return nb


@pytest.mark.slow
def test_loss_playground_runs():
    nb = _run("loss_playground.ipynb", smoke=True)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "budget   512: advantage +1.074" in outputs
    assert "budget  2560: advantage -1.343" in outputs
    assert "-3.923" in outputs  # all wrong at b = 512 gives -f2(512)
