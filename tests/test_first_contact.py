"""Every way people write Python runs the same experiment: a plain script without a main guard,
``python -``, ``python -c``, IPython, a module that runs it while being imported, and a notebook
(once, and with every cell run twice). Workers never import the user's main module.

Each variant is a separate Python process on the same small deterministic experiment, so all
must end with the same records.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

import cerebro

# One experiment, split into the cells a notebook user would write. No `if __name__` guard.
CELLS = [
    """
    import numpy as np
    import torch
    import cerebro

    rng = np.random.default_rng(0)
    X = rng.normal(size=(240, 6)).astype("float32")
    Y = (X[:, 0] + X[:, 1] > 0).astype("int64")
    dataset = cerebro.prepare_data({"x": X, "y": Y}, "data/toy", label="y", num_shards=2)
    """,
    """
    WIDTH = 12  # a global that build uses: it travels with build, by value

    def accuracy_of(outputs, targets):
        return (outputs.argmax(1) == targets).float().mean()

    def build(params):
        model = torch.nn.Sequential(
            torch.nn.Linear(6, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, 2)
        )
        return cerebro.ModelSpec(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=params["lr"]),
            loss=torch.nn.CrossEntropyLoss(),
            batch_size=16,
            metrics={"accuracy": accuracy_of},
        )
    """,
    """
    result = cerebro.Experiment(
        build, dataset, cerebro.GridSearch({"lr": cerebro.choice([0.05, 0.2])}), epochs=2,
        metric="val_accuracy", mode="max", backend=cerebro.LocalBackend(workers=2),
        path="runs/exp", seed=0, deterministic=True, progress=False,
    ).run()
    print("STATUSES", sorted(m.status for m in result.models))
    """,
]
SCRIPT = "\n".join(textwrap.dedent(cell) for cell in CELLS)


def _python(args: list[str], cwd, stdin: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "STATUSES ['completed', 'completed']" in done.stdout, done.stdout[-2000:]
    return done


def _records(folder) -> pd.DataFrame:
    return cerebro.load(os.path.join(folder, "runs", "exp")).history


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pd.DataFrame:
    """The experiment run as a plain script without a guard (variant a)."""
    folder = tmp_path_factory.mktemp("script")
    (folder / "experiment.py").write_text(SCRIPT)
    _python(["experiment.py"], folder)
    return _records(folder)


def test_a_plain_script_without_a_main_guard_runs(reference):
    assert len(reference) == 2 * 2  # two models, two epochs
    assert (reference["val_accuracy"] > 0.5).all()


@pytest.mark.parametrize("how", ["stdin", "-c", "ipython", "imported module"])
def test_the_same_experiment_from_stdin_c_ipython_or_an_import(tmp_path, reference, how):
    if how == "stdin":
        _python(["-"], tmp_path, stdin=SCRIPT)
    elif how == "-c":
        _python(["-c", SCRIPT], tmp_path)
    elif how == "ipython":
        (tmp_path / "experiment.py").write_text(SCRIPT)
        _python(["-m", "IPython", "--no-banner", "--quick", "experiment.py"], tmp_path)
    else:  # build lives in a module that runs the experiment while it is being imported
        (tmp_path / "my_experiment.py").write_text(SCRIPT)
        _python(["-c", "import my_experiment"], tmp_path)
    pd.testing.assert_frame_equal(_records(tmp_path), reference, check_exact=True)


def _run_notebook(folder, cells: list[str]) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(textwrap.dedent(c)) for c in cells]
    client = NotebookClient(
        notebook,
        timeout=180,
        kernel_name="python3",
        resources={"metadata": {"path": str(folder)}},
    )
    client.execute()
    return notebook


def _printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream"
    )


def test_a_notebook_runs_the_experiment(tmp_path, reference):
    notebook = _run_notebook(tmp_path, CELLS)
    assert "STATUSES ['completed', 'completed']" in _printed(notebook)
    pd.testing.assert_frame_equal(_records(tmp_path), reference, check_exact=True)


def test_running_every_notebook_cell_twice_reopens_the_data_and_the_finished_run(
    tmp_path, reference
):
    notebook = _run_notebook(tmp_path, CELLS + CELLS)
    assert _printed(notebook).count("STATUSES ['completed', 'completed']") == 2
    pd.testing.assert_frame_equal(_records(tmp_path), reference, check_exact=True)
    hops = cerebro.load(tmp_path / "runs" / "exp").hops
    assert not hops.duplicated(["model_id", "epoch", "kind", "shard"]).any()  # nothing retrained
