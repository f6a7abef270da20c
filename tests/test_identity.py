"""An experiment's identity includes what it trains: a rerun on the same path with an edited
``build`` is refused (saying what differs), unless resume="force" or overwrite=True."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import builders
import cloudpickle
import pandas as pd
import pytest
from conftest import small_experiment

import cerebro
from cerebro.engine import identity
from cerebro.engine.result import BUILD_FILE

HERE = os.path.dirname(os.path.abspath(__file__))


def _experiment(digits, path, build=builders.mlp, **overrides):
    one_model = {"search": cerebro.GridSearch({"lr": 0.01}), "backend": cerebro.LocalBackend(1)}
    return small_experiment(digits, path, build=build, **{**one_model, **overrides})


def _build_file(path) -> bytes:
    return (path / BUILD_FILE).read_bytes()


def test_an_edited_build_is_refused_naming_the_configuration_and_field(digits, tmp_path):
    path = tmp_path / "run"
    first = _experiment(digits, path).run()
    kept = _build_file(path)
    edits = {
        builders.mlp_wide: "parameter 1.weight shape (32, 64) recorded, now (64, 64)",
        builders.mlp_l2: "optimizer group 0 weight_decay 0.0 recorded, now 0.01",
        builders.mlp_batch_64: "batch_size 32 recorded, now 64",
        builders.mlp_same_models: "the code of build changed",
    }
    for build, difference in edits.items():
        with pytest.raises(cerebro.ConfigError) as refused:
            _experiment(digits, path, build).run()
        message = str(refused.value)
        assert message.startswith(f"build={build!r}"), message
        where = "" if build is builders.mlp_same_models else "model 0 (lr=0.01): "
        assert f"({where}{difference}" in message, message
        assert 'pass overwrite=True to start a new experiment, or resume="force"' in message
    # Nothing was written: the records, build.pkl and the trained model are as they were.
    assert _build_file(path) == kept
    again = cerebro.load(path)
    pd.testing.assert_frame_equal(again.hops, first.hops)
    assert again.load_model(0)[1].out_features == 32


def test_the_same_build_rerun_returns_the_finished_result(digits, tmp_path):
    path = tmp_path / "run"
    first = _experiment(digits, path).run()
    written = os.stat(path / BUILD_FILE).st_mtime_ns
    again = _experiment(digits, path).run()
    pd.testing.assert_frame_equal(again.hops, first.hops)
    assert os.stat(path / BUILD_FILE).st_mtime_ns == written  # never replaced under records
    assert again.experiment["config"]["build_code"] == identity.code_fingerprint(builders.mlp)
    assert list(again.experiment["config"]["model_fingerprints"]["models"]) == ["0"]


def test_resume_force_continues_the_recorded_models_with_the_new_build(digits, tmp_path):
    path = tmp_path / "run"
    first = _experiment(digits, path).run()
    with pytest.warns(UserWarning, match=r'resume="force": model 0 \(lr=0.01\): optimizer group'):
        forced = _experiment(digits, path, builders.mlp_l2, resume="force").run()
    pd.testing.assert_frame_equal(forced.hops, first.hops)
    assert [e["kind"] for e in forced.events].count("build_replaced") == 1
    # The new build is kept (build.pkl and the records): it is now this experiment's build.
    assert cloudpickle.loads(_build_file(path)) is builders.mlp_l2
    assert cerebro.load(path).load_model(0)[1].out_features == 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _experiment(digits, path, builders.mlp_l2).run()
    with pytest.raises(cerebro.ConfigError, match=r"weight_decay 0.01 recorded, now 0.0"):
        _experiment(digits, path).run()


def test_overwrite_starts_afresh_with_the_new_build(digits, tmp_path):
    path = tmp_path / "run"
    first = _experiment(digits, path).run()
    fresh = _experiment(digits, path, builders.mlp_wide, overwrite=True).run()
    assert len(fresh.hops) == len(first.hops)  # trained again
    fingerprints = identity.Fingerprints(fresh.experiment["config"]["model_fingerprints"])
    assert fingerprints.fields("0")["parameter 1.weight shape"] == "(64, 64)"
    assert cloudpickle.loads(_build_file(path)) is builders.mlp_wide
    assert cerebro.load(path).load_model(0)[1].out_features == 64


def test_records_without_fingerprints_are_accepted(digits, tmp_path):
    from cerebro.store import open_engine, sqlite_url
    from cerebro.store.records import experiments

    path = tmp_path / "run"
    _experiment(digits, path).run()
    engine = open_engine(sqlite_url(str(path)))
    with engine.begin() as conn:  # as an older version recorded it
        row = conn.execute(experiments.select()).mappings().one()
        config = dict(row["config"])
        del config["build_code"], config["model_fingerprints"]
        conn.execute(experiments.update().values(config=config))
    engine.dispose()
    kept = _build_file(path)
    _experiment(digits, path, builders.mlp_wide).run()  # cannot be compared: accepted
    assert _build_file(path) == kept


SOURCE = '''
import torch, cerebro

WIDTH = {width}

def hidden(width):
    return torch.nn.Linear(64, width)

def build(params):
    """A docstring."""
    act = "relu" if params.get("act", "relu") in {{"relu", "gelu", "tanh"}} else "x"
    model = torch.nn.Sequential(torch.nn.Flatten(), hidden(WIDTH), torch.nn.ReLU(),
                                torch.nn.Linear(WIDTH, {classes}))
    opt = torch.optim.SGD(model.parameters(), lr=params.get("lr", 0.1))
    return cerebro.ModelSpec(model, opt, torch.nn.CrossEntropyLoss(), batch_size=32)
'''


def _defined(source: str):
    namespace = {"__name__": "__main__"}
    exec(compile(source, "<cell>", "exec"), namespace)
    return namespace["build"]


def test_identical_code_defined_twice_fingerprints_equal(digits):
    source = SOURCE.format(width=32, classes=10)
    one, two = _defined(source), _defined("\n\n\n" + source)  # a cell run again, lines moved
    assert one is not two
    for _ in range(50):  # the interpreter's specialized bytecode is not what counts
        one({})
    assert identity.code_fingerprint(one) == identity.code_fingerprint(two) is not None
    assert identity.spec_fingerprint(one({})) == identity.spec_fingerprint(two({}))
    # A constant changed, in build itself or in what it uses of its own module, counts.
    fingerprint = identity.code_fingerprint(one)
    assert identity.code_fingerprint(_defined(SOURCE.format(width=32, classes=9))) != fingerprint
    assert identity.code_fingerprint(_defined(SOURCE.format(width=64, classes=10))) != fingerprint
    changed_helper = source.replace("Linear(64, width)", "Linear(64, width, bias=False)")
    assert identity.code_fingerprint(_defined(changed_helper)) != fingerprint


def test_the_code_fingerprint_is_the_same_in_another_process():
    source = SOURCE.format(width=32, classes=10)
    script = (
        f"import sys; sys.path.insert(0, {HERE!r})\n"
        "import builders\nfrom cerebro.engine import identity\nfrom test_identity import _defined\n"
        f"print(identity.code_fingerprint(builders.mlp_wide))\n"
        f"print(identity.code_fingerprint(_defined({source!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        identity.code_fingerprint(builders.mlp_wide),
        identity.code_fingerprint(_defined(source)),
    ]


@pytest.mark.parametrize("resume", [True, "yes", None])
def test_a_bad_resume_value_is_refused(digits, tmp_path, resume):
    with pytest.raises(cerebro.ConfigError, match=rf"resume={resume!r} .*'auto' .* or 'force'"):
        _experiment(digits, tmp_path / "run", resume=resume)


def test_resume_force_with_overwrite_is_refused(digits, tmp_path):
    with pytest.raises(cerebro.ConfigError, match=r"resume='force' .*overwrite starts afresh"):
        _experiment(digits, tmp_path / "run", resume="force", overwrite=True)
