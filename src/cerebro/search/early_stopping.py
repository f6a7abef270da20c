"""Early-stopping rules that prune models at epoch boundaries, whatever the search.

Each is a :class:`~cerebro.search.base.Scheduler` (``Experiment(scheduler=MedianStopping())``),
or can be given beside one (``early_stopping=``: asked first, after a model's new epoch only).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from ..errors import check_int
from ..history import as_finite
from .base import EarlyStopping, Trial


class MedianStopping(EarlyStopping):
    """The median stopping rule (Golovin et al. 2017, "Google Vizier").

    After a model's newest epoch t (``trial.epochs_done``, counting from 1) with
    ``t > grace_epochs``, the model is stopped if its best metric so far is strictly worse than
    the median of the running averages (mean of the metric over epochs 1..t) of the *other*
    models that have at least t finished epochs, provided there are at least ``min_trials`` of
    them. Every other model counts, whatever its status or origin; epochs whose metric is missing
    or not finite are left out of the averages, and a model with no finite value in its first t
    epochs does not count. A model with no finite value so far is left alone (failures are the
    driver's business).

    As a scheduler (or an early-stopping rule), :meth:`decide` stops such a model with the
    reason ``"MedianStopping: median stopping: ..."`` and lets every other one continue.

    Example:
        >>> from cerebro.search.base import SearchContext, Trial
        >>> from cerebro.search.early_stopping import MedianStopping
        >>> rule = MedianStopping(grace_epochs=1, min_trials=3)
        >>> rule.attach(SearchContext("val_loss", "min", 10, 4, 4))
        >>> others = [Trial(i, {}, "running", [{"val_loss": v}, {"val_loss": v}])
        ...           for i, v in enumerate([0.3, 0.4, 0.5])]
        >>> late = Trial(3, {}, "running", [{"val_loss": 0.9}, {"val_loss": 0.8}])
        >>> rule.should_stop(late, others + [late]) is not None
        True
        >>> rule.decide(late, others + [late]).action
        <Action.STOP: 'stop'>
    """

    def __init__(self, grace_epochs: int = 1, min_trials: int = 3) -> None:
        self.grace_epochs: int = check_int("grace_epochs", grace_epochs, minimum=0, unit="epochs")
        self.min_trials: int = check_int("min_trials", min_trials, minimum=1, unit="models")

    def should_stop(self, trial: Trial, trials: Sequence[Trial]) -> str | None:
        if self.context is None:
            raise RuntimeError("MedianStopping must be attached to an experiment first")
        context = self.context
        metric = context.metric
        t = trial.epochs_done
        if t <= self.grace_epochs:
            return None
        own = [v for h in trial.history if (v := as_finite(h.get(metric))) is not None]
        if not own:
            return None
        best = max(own, key=context.score)
        averages = []
        for other in trials:
            if other.model_id == trial.model_id or other.epochs_done < t:
                continue
            values = [v for h in other.history[:t] if (v := as_finite(h.get(metric))) is not None]
            if values:
                averages.append(sum(values) / len(values))
        if len(averages) < self.min_trials:
            return None
        median = statistics.median(averages)
        if context.score(best) < context.score(median):
            return (
                f"median stopping: best {metric} {best:.4g} after {t} epochs is worse than "
                f"the median {median:.4g} of the running averages of {len(averages)} other "
                f"models at epoch {t}"
            )
        return None

    def __repr__(self) -> str:
        return f"MedianStopping(grace_epochs={self.grace_epochs}, min_trials={self.min_trials})"

    def fingerprint(self) -> str:
        return repr(self)
