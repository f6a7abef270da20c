"""The README's example: random search over an MLP on scikit-learn's digits with MOP.

A plain script: no main guard needed. Run it again and it reopens the data and returns the
finished experiment from its records.
"""

import torch
from sklearn.datasets import load_digits

import cerebro


def build(params: dict) -> cerebro.ModelSpec:
    model = torch.nn.Sequential(
        torch.nn.Linear(64, params["width"]),
        torch.nn.ReLU(),
        torch.nn.Dropout(params["dropout"]),
        torch.nn.Linear(params["width"], 10),
    )
    return cerebro.ModelSpec(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=params["lr"], weight_decay=params["l2"]),
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=params["batch_size"],
        metrics={"accuracy": cerebro.metrics.accuracy},
    )


space = {
    "lr": cerebro.loguniform(1e-4, 1e-1),
    "batch_size": cerebro.choice([32, 64]),
    "width": cerebro.randint(16, 128),
    "dropout": cerebro.uniform(0.0, 0.5),
    "l2": cerebro.quniform(0.0, 0.01, 0.001),
}

digits = load_digits()
ds = cerebro.prepare_data(
    {"pixels": digits.data / 16, "digit": digits.target},
    "data/digits",
    label="digit",
    num_shards=4,
    validation=0.2,
    seed=0,
)
exp = cerebro.Experiment(
    build,
    dataset=ds,
    search=cerebro.RandomSearch(space, num_models=8, seed=0),
    epochs=5,
    metric="val_accuracy",
    mode="max",
    backend=cerebro.LocalBackend(workers=2),
    path="runs/quickstart",
    seed=0,
)
result = exp.run()
print(result)
print(result.leaderboard().to_string())
model = result.load_model()
