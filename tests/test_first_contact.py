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
    import sys
    print("OPTIONAL", sorted(m for m in ("optuna", "ray", "sklearn") if m in sys.modules))
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
    done = _python(["experiment.py"], folder)
    # A run loads nothing optional that it does not use (no TPE: no Optuna; no Ray; no sklearn).
    assert "OPTIONAL []" in done.stdout, done.stdout
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


# Bad input: what workers could not receive is refused before any worker starts ---------------


def _experiment(build, digits, tmp_path) -> cerebro.Experiment:
    return cerebro.Experiment(
        build, digits, cerebro.GridSearch({"lr": 0.1}), path=tmp_path / "run", progress=False
    )


def test_a_build_that_cannot_be_pickled_is_named_before_any_worker_starts(digits, tmp_path):
    import builders

    log = open(tmp_path / "log.txt", "w")  # noqa: SIM115 - the point is an open file

    def build(params):
        log.write("building\n")
        return builders.mlp(params)

    with pytest.raises(cerebro.ConfigError) as error:
        _experiment(build, digits, tmp_path)
    message = str(error.value)
    assert message.startswith("build=")
    assert "log = TextIOWrapper" in message and "module level" in message
    assert not (tmp_path / "run").exists()
    log.close()


def test_a_build_from_a_module_workers_cannot_import_is_named(digits, tmp_path):
    import importlib.util

    source = tmp_path / "elsewhere" / "hidden_models.py"
    source.parent.mkdir()
    source.write_text("from builders import mlp\n\ndef build(params):\n    return mlp(params)\n")
    spec = importlib.util.spec_from_file_location("hidden_models", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules["hidden_models"] = module  # imported by file path: not on sys.path
    try:
        spec.loader.exec_module(module)
        with pytest.raises(cerebro.ConfigError) as error:
            _experiment(module.build, digits, tmp_path)
    finally:
        del sys.modules["hidden_models"]
    message = str(error.value)
    assert "hidden_models.build" in message and "cannot import module 'hidden_models'" in message
    assert "sys.path" in message
    assert not (tmp_path / "run").exists()


def test_a_worker_that_cannot_import_builds_module_names_it_and_its_path(tmp_path):
    from cerebro.backends.shipping import pickle_build

    (tmp_path / "only_here.py").write_text("def build(params):\n    return params\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import only_here

        payload = tmp_path / "build.pkl"
        payload.write_bytes(pickle_build(only_here.build))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("only_here", None)
    code = (
        "import sys; from cerebro.backends.shipping import load_build; "
        f"load_build(open({str(payload)!r}, 'rb').read())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "cannot import module 'only_here'" in done.stderr and "sys.path" in done.stderr


def test_a_notebook_shows_progress_as_one_display_updated_in_place(tmp_path):
    cells = [*CELLS[:2], CELLS[2].replace("progress=False", "progress=True")]
    notebook = _run_notebook(tmp_path, cells)
    shown = [
        output
        for output in notebook.cells[2].outputs
        if output.get("output_type") == "display_data"
    ]
    assert len(shown) == 1, [o.get("output_type") for o in notebook.cells[2].outputs]
    text = shown[0]["data"]["text/plain"]
    assert "epoch 2/2" in text and "2/2 done" in text and "best val_accuracy" in text
