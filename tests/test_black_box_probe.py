"""The black-box probe of bad input, rerun as a new user meets it: every case must fail with a
clear cerebro error that names the argument or the path, before any worker starts, and leave
whatever was there intact.

The probe's fault cases that need a running experiment (an edited build, a 0-byte database
beside checkpoints, a stopped or killed worker, a killed driver, a read-only archived run) are
tested where their machinery lives: test_identity.py, test_records_faults.py and
test_worker_failure.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import builders
import numpy as np
import pandas as pd
import pytest

import cerebro
from cerebro import cli


@dataclass
class Probe:
    """Where a case runs: a scratch folder, a good prepared dataset, and a backend to watch."""

    folder: Path
    dataset: cerebro.Dataset
    backend: cerebro.LocalBackend

    def experiment(self, build=builders.mlp, space=None, **options: Any) -> cerebro.Experiment:
        arguments: dict[str, Any] = {
            "epochs": 1,
            "metric": "val_accuracy",
            "mode": "max",
            "backend": self.backend,
            "path": self.folder / "run",
            "progress": False,
        }
        arguments.update(options)
        search = cerebro.GridSearch(space or {"lr": cerebro.choice([0.01])})
        return cerebro.Experiment(build, self.dataset, search, **arguments)

    def prepare(self, source: Any, **options: Any) -> cerebro.Dataset:
        options.setdefault("label", "y")
        options.setdefault("num_shards", 2)
        return cerebro.prepare_data(source, self.folder / "data", **options)

    def write(self, name: str, content: bytes | str) -> Path:
        path = self.folder / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path


def _table(rows: int = 12, **columns: Any) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(rows, 3)), "y": np.arange(rows) % 2, **columns}


def _cerebro_models(path: Path) -> None:
    """The `cerebro models` command, as a person types it: a refusal exits with code 2."""
    code = cli.main(["models", str(path)])
    if code == 2:
        raise cerebro.ConfigError("path", str(path), "an experiment's records (cerebro said so)")


def _nan_at(column: str, row: int) -> dict[str, Any]:
    table = _table()
    table[column] = table[column].astype(float)
    table[column][row] = np.nan
    return table


# (case, what it does, what the message must contain). Every case raises a ConfigError.
CASES: list[tuple[str, Callable[[Probe], Any], list[str]]] = [
    # Data: preparation
    ("num_shards=0", lambda p: p.prepare(_table(), num_shards=0), ["num_shards=0"]),
    ("validation=1.5", lambda p: p.prepare(_table(), validation=1.5), ["validation=1.5"]),
    ("label not a column", lambda p: p.prepare(_table(), label="z"), ["label='z'"]),
    ("more shards than rows", lambda p: p.prepare(_table(), num_shards=50), ["num_shards=50"]),
    ("NaN in a feature", lambda p: p.prepare(_nan_at("x", 3)), ["features['x']", "row 3"]),
    (
        "inf in a feature",
        lambda p: p.prepare(_table(x=np.where(np.eye(12, 3) > 0, np.inf, 0.0))),
        ["features['x']", "inf"],
    ),
    ("NaN in the label", lambda p: p.prepare(_nan_at("y", 5)), ["label['y']", "row 5"]),
    (
        "labels of mixed types",
        lambda p: p.prepare(_table(rows=4, y=np.array([1, "1", 2, 2.0], dtype=object))),
        ["label", "int", "str", "float"],
    ),
    (
        "dict labels",
        lambda p: p.prepare(pd.DataFrame({"x": [0.0, 1.0] * 6, "y": [{"a": 1}, {"a": 2}] * 6})),
        ["label", "dict"],
    ),
    (
        "ragged lists in a column",
        lambda p: p.prepare(pd.DataFrame({"x": [[1.0, 2.0], [1.0]] * 6, "y": [0, 1] * 6})),
        ["'x'", "row 1"],
    ),
    (
        "a null in a list column",
        lambda p: p.prepare(pd.DataFrame({"x": [[1.0, 2.0], None] * 6, "y": [0, 1] * 6})),
        ["'x'", "row 1"],
    ),
    ("a header-only CSV", lambda p: p.prepare(str(p.write("h.csv", "x,y\n"))), ["0 rows"]),
    ("a 0-byte CSV", lambda p: p.prepare(str(p.write("empty.csv", b""))), ["empty.csv"]),
    (
        "overwrite=True on a folder of someone's files",
        lambda p: (
            (p.folder / "data").mkdir(),
            (p.folder / "data" / "thesis.tex").write_text("years of work"),
            p.prepare(_table(), overwrite=True),
        ),
        ["thesis.tex"],
    ),
    (
        "the same folder prepared with other arguments",
        lambda p: (p.prepare(_table()), p.prepare(_table(), num_shards=3)),
        ["num_shards=2, now 3"],
    ),
    # Data: opening
    ("a dataset path that is a file", lambda p: cerebro.Dataset.open(p.write("f", "x")), ["/f'"]),
    ("a folder that is no dataset", lambda p: cerebro.Dataset.open(p.folder), ["manifest"]),
    # Search spaces
    ("quniform without a multiple of q", lambda p: cerebro.quniform(0.05, 0.1, 0.3), ["quniform"]),
    ("loguniform from 0", lambda p: cerebro.loguniform(0.0, 1.0), ["loguniform"]),
    ("randint with low > high", lambda p: cerebro.randint(5, 1), ["randint"]),
    ("an empty choice", lambda p: cerebro.choice([]), ["choice"]),
    (
        "a numpy array as a space value",
        lambda p: cerebro.RandomSearch({"w": np.array([16, 32])}, 2),
        ["space['w']", "cerebro.choice("],
    ),
    (
        "a range as a space value",
        lambda p: cerebro.GridSearch({"w": range(16, 64, 16)}),
        ["space['w']", "cerebro.choice("],
    ),
    (
        "a continuous dimension in a grid",
        lambda p: cerebro.GridSearch({"lr": cerebro.uniform(0.0, 1.0)}),
        ["lr"],
    ),
    ("num_models=0", lambda p: cerebro.RandomSearch({"lr": 0.1}, 0), ["num_models=0"]),
    # Experiment arguments
    ("epochs=0", lambda p: p.experiment(epochs=0), ["epochs=0"]),
    ("mode='best'", lambda p: p.experiment(mode="best"), ["mode='best'"]),
    ("a metric without split", lambda p: p.experiment(metric="accuracy"), ["metric='accuracy'"]),
    ("a metric the spec lacks", lambda p: p.experiment(metric="val_f1").run(), ["val_f1"]),
    ("keep_checkpoints='some'", lambda p: p.experiment(keep_checkpoints="some"), ["keep_"]),
    ("resume='yes'", lambda p: p.experiment(resume="yes"), ["resume='yes'"]),
    ("an experiment path that is a file", lambda p: p.experiment(path=p.write("f", "")), ["path"]),
    (
        "an experiment path under a file",
        lambda p: p.experiment(path=p.write("g", "") / "run"),
        ["path"],
    ),
    ("workers=0", lambda p: cerebro.LocalBackend(workers=0), ["workers=0"]),
    ("workers > num_shards", lambda p: p.experiment(backend=cerebro.LocalBackend(9)), ["9"]),
    ("a CUDA device that is not there", lambda p: cerebro.LocalBackend(devices=["cuda:9"]), []),
    ("worker_timeout=0", lambda p: cerebro.LocalBackend(worker_timeout=0), ["worker_timeout"]),
    # What build makes: refused by the trial step before any worker starts
    ("batch_size=0", lambda p: p.experiment(builders.batch_size_zero).run(), ["batch_size"]),
    (
        "an optimizer over another model's parameters",
        lambda p: p.experiment(builders.optimizer_of_another_model).run(),
        ["optimizer"],
    ),
    (
        "a loss that is not a scalar",
        lambda p: p.experiment(builders.loss_per_row).run(),
        ["loss", "reduction='mean'"],
    ),
    (
        "a metric that raises",
        lambda p: p.experiment(builders.metric_that_raises).run(),
        ["metrics['broken']"],
    ),
    (
        "a metric with one value per row",
        lambda p: p.experiment(builders.metric_per_row).run(),
        ["metrics['per_row']"],
    ),
    (
        "a model whose input size does not match the data",
        lambda p: p.experiment(builders.wrong_input_size).run(),
        ["model", "per row"],
    ),
    ("build returns no ModelSpec", lambda p: p.experiment(builders.not_a_spec).run(), ["build"]),
    (
        "a build workers cannot receive (it writes to an open file)",
        lambda p: p.experiment(_writes_to(open(p.folder / "log", "w"))),  # noqa: SIM115
        ["build", "TextIOWrapper", "module level"],
    ),
    # Records
    (
        "cerebro.load of garbage records",
        lambda p: cerebro.load(_garbage_records(p)),
        ["cerebro.db"],
    ),
    (
        "`cerebro models` on garbage records",
        lambda p: _cerebro_models(_garbage_records(p)),
        ["path"],
    ),
    (
        "`cerebro models` on a 0-byte database",
        lambda p: _cerebro_models(_empty_records(p)),
        ["path"],
    ),
    ("cerebro.load of a folder with no records", lambda p: cerebro.load(p.folder), ["path"]),
]


def _writes_to(handle: Any) -> Callable[[dict], cerebro.ModelSpec]:
    def build(params: dict) -> cerebro.ModelSpec:
        handle.write("building\n")
        return builders.mlp(params)

    return build


def _garbage_records(probe: Probe) -> Path:
    (probe.folder / "run").mkdir(exist_ok=True)
    probe.write("run/cerebro.db", os.urandom(4096))
    return probe.folder / "run"


def _empty_records(probe: Probe) -> Path:
    (probe.folder / "run").mkdir(exist_ok=True)
    probe.write("run/cerebro.db", b"")
    return probe.folder / "run"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("case", "action", "named"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_before_any_worker_starts(
    digits, tmp_path, capsys, case, action, named
):
    probe = Probe(tmp_path, digits, cerebro.LocalBackend(workers=1))
    with pytest.raises(cerebro.ConfigError) as error:
        action(probe)
    message = str(error.value)
    for part in named:
        assert part in message, f"{case}: {part!r} not in {message!r}"
    assert probe.backend.pids() == [], f"{case}: a worker was started"
    assert not (tmp_path / "run" / "checkpoints").exists(), f"{case}: something was trained"


def test_the_probe_leaves_someones_files_and_empty_records_as_they_were(tmp_path, digits):
    probe = Probe(tmp_path, digits, cerebro.LocalBackend(workers=1))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "thesis.tex").write_text("years of work")
    _empty_records(probe)
    before = _files(tmp_path)
    for action in (
        lambda: probe.prepare(_table(), overwrite=True),
        lambda: _cerebro_models(tmp_path / "run"),
        lambda: cerebro.load(tmp_path / "run"),
    ):
        with pytest.raises(cerebro.ConfigError):
            action()
    assert _files(tmp_path) == before
