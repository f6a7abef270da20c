"""The named values parts of Cerebro exchange (and the records hold): one definition of each.

They are ``str`` enums, so a value read back from the records (a plain string) compares equal
to its member, and a member is written to the records, JSON or a log as its plain value.

Example:
    >>> from cerebro.kinds import ModelStatus
    >>> ModelStatus("paused") is ModelStatus.PAUSED, ModelStatus.PAUSED == "paused"
    (True, True)
    >>> f"model 3 is {ModelStatus.PRUNED}"
    'model 3 is pruned'
"""

from __future__ import annotations

from enum import Enum


class _Named(str, Enum):
    """A str enum whose str() and format() are its value (as StrEnum, which is Python 3.11+)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class ModelStatus(_Named):
    """Where a model is in its life.

    ``PAUSED``: waiting at an epoch boundary for a scheduler to decide (e.g. ASHA waiting for a
    rung to have enough results); ``STOPPED``: by a person, resumable; ``PRUNED``: by a
    scheduler or an early-stopping rule (also resumable by a person).
    """

    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"
    PRUNED = "pruned"

    @property
    def is_live(self) -> bool:
        """Running or paused: it may still train without a person's help."""
        return self in (ModelStatus.RUNNING, ModelStatus.PAUSED)

    @property
    def is_final(self) -> bool:
        """Completed or failed: nothing trains it again unless a person gives it more epochs."""
        return self in (ModelStatus.COMPLETED, ModelStatus.FAILED)

    @property
    def ended_early(self) -> bool:
        """Left before its budget (failed, stopped, pruned): what it trained is all it does."""
        return self in (ModelStatus.FAILED, ModelStatus.STOPPED, ModelStatus.PRUNED)


class Origin(_Named):
    """Who started a model: the search, or a person (adding a model, or cloning one)."""

    SEARCH = "search"
    ADD = "add"
    CLONE = "clone"


class UnitKind(_Named):
    """What a unit does on its shard: a training hop or an evaluation pass."""

    TRAIN = "train"
    EVAL = "eval"


class Action(_Named):
    """What a model does after an epoch (see :class:`cerebro.search.Decision`)."""

    CONTINUE = "continue"
    PAUSE = "pause"
    STOP = "stop"
    EXPLOIT = "exploit"


class EventKind(_Named):
    """The kinds of run-level events in the records (``cerebro.load(path).events``)."""

    PAUSED = "paused"
    PRUNED = "pruned"
    CONTINUED = "continued"
    EXPLOIT = "exploit"
    EXPLOIT_RECOVERED = "exploit_recovered"
    STATE_RECOVERED = "state_recovered"
    STATE_ROLLED_BACK = "state_rolled_back"  # a newest state lost with a worker: back to its file
    WORKER_LOST = "worker_lost"
    HANDOVER_FAILED = "handover_failed"  # a unit's new states could not be handed over: rerun
    CONTROL = "control"
    BUILD_REPLACED = "build_replaced"
    FUSION_COHORT = "fusion_cohort"  # models that may train fused, and their shared shard order
    NOT_FUSED = "not_fused"  # a model that trains alone with fusion on, and why
    FUSION_KEY = "fusion_key"  # an exploit changed what a model may be fused with
    FEATURE_PLAN = "feature_plan"  # prefixed models' chains and the prefix depths kept
    MATERIALIZED = "materialized"  # a kept prefix depth computed for one shard
    DATASET_GROWN = "dataset_grown"  # the run went on with a later version of its dataset
    GROUP_MODEL = "group_model"  # per_group=True: a model's group and configuration


class ExperimentStatus(_Named):
    """An experiment as a whole: a driver runs it, it finished, or its driver stopped early
    (an error, Ctrl-C, or a killed process, told by the driver's lock being free)."""

    RUNNING = "running"
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"


class ControlOp(_Named):
    """What a person may ask of a running experiment (see :func:`cerebro.control`)."""

    STOP = "stop"
    RESUME = "resume"
    SET_EPOCHS = "set_epochs"
    CLONE = "clone"
    ADD = "add"


class ControlState(_Named):
    """Where a request is: waiting for the driver, or settled one way or the other."""

    PENDING = "pending"
    APPLIED = "applied"
    REJECTED = "rejected"
