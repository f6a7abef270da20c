"""Metric functions: each returns the mean over the batch's rows as a scalar tensor.

Cerebro multiplies each batch's value by its row count and divides by the split's rows, so any
function that is a mean over rows is reported exactly over the whole split. The built-in metrics
compute in float64 so that, e.g., accuracy is an exact fraction of correct rows.
"""

from __future__ import annotations

import torch


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows classified correctly.

    ``outputs`` of shape (N, C) are scores per class (argmax is taken); outputs of shape (N,) or
    (N, 1) are logits of a binary classifier (positive when > 0).

    >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
    tensor(0.5000, dtype=torch.float64)
    """
    if outputs.dim() >= 2 and outputs.shape[-1] > 1:
        predicted = outputs.argmax(dim=-1)
    else:
        predicted = (outputs.reshape(targets.shape) > 0).to(targets.dtype)
    return (predicted == targets).double().mean()


def mean_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of squared differences over rows (and over elements within a row)."""
    diff = outputs.reshape(targets.shape).double() - targets.double()
    return diff.pow(2).mean()


def mean_absolute_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of absolute differences over rows (and over elements within a row)."""
    diff = outputs.reshape(targets.shape).double() - targets.double()
    return diff.abs().mean()


mse = mean_squared_error
mae = mean_absolute_error
