"""``Experiment``: the public entry point that checks its inputs, then runs the driver."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from .. import files
from ..backends import Backend, LocalBackend
from ..backends.shipping import pickle_build
from ..backends.worker import in_worker
from ..data import Dataset, DatasetVersion
from ..errors import (
    AllModelsFailed,
    ConfigError,
    check_bool,
    check_int,
    first_line,
    is_int,
    shown_url,
)
from ..files import write_bytes_atomically
from ..kinds import EventKind, ExperimentStatus
from ..search import Search
from ..search.base import (
    COMPLETED,
    FAILED,
    PAUSED,
    PRUNED,
    STOPPED,
    EarlyStopping,
    Scheduler,
    SearchContext,
)
from ..space import describe_space
from ..spec import ModelSpec
from ..store import (
    RecordStore,
    checkpoints,
    normalize_url,
    open_engine,
    place,
    sqlite_file,
    sqlite_url,
)
from ..trackers import RunInfo, Tracker, Trackers
from ..trackers.progress import RunProgress
from ..trackers.tensorboard import TensorBoardLog
from ..trackers.tensorboard import available as tensorboard_available
from . import identity
from .driver import Driver, RunConfig
from .grouping import Fusion, fusion_option
from .groups import per_group_option
from .materializing import Materialize, materialize_option
from .result import BUILD_FILE, Result


class Experiment:
    """Train every configuration a search proposes, with model hopper parallelism.

    Args:
        build: ``build(params) -> cerebro.ModelSpec``, called once per configuration (with torch
            seeded, so initial weights are reproducible). Define it at module level or in a
            script; closures are fine too (it is shipped to workers with cloudpickle).
        dataset: a :class:`cerebro.Dataset` (or the path of one).
        search: which configurations to train, e.g. :class:`cerebro.GridSearch`.
        epochs: epochs per model.
        metric: the metric that ranks models, e.g. ``"val_accuracy"`` or ``"val_loss"``.
        mode: ``"max"`` if larger ``metric`` is better, ``"min"`` if smaller is.
        backend: where to train; default ``LocalBackend(workers=min(2, num_shards))``.
        path: folder for the records (``cerebro.db``) and checkpoints.
        seed: seeds initialization and the row order of every hop.
        progress: show a live progress bar.
        deterministic: fix each model's shard order per epoch and seed all randomness per
            (model, epoch, shard), so that final weights and metrics are bit-identical on CPU
            whatever the number of workers and the timing. Free mode (the default) lets a model
            take whichever of its remaining shards a worker frees up first.
        overwrite: replace records of an earlier experiment at ``path`` (or of the same name in
            ``storage``). Only what cerebro wrote is deleted (records, checkpoints,
            ``build.pkl``, ``tensorboard/``); a folder holding only other files is refused.
        storage: a SQLAlchemy database URL for the records, e.g.
            ``"postgresql://user:password@host/db"`` (needs ``pip install cerebro[postgres]``).
            Default: the SQLite file ``<path>/cerebro.db``. Checkpoints stay under ``path``.
        keep_checkpoints: which end-of-epoch checkpoints each model keeps under
            ``<path>/checkpoints/model-NNNNN/epoch-NNNN.pt``: ``"last_and_best"`` (by ``metric``),
            ``"last"``, ``"all"``, or k (the last k and the best). Each has a checksum in the
            records; a model whose state is lost restarts from its newest good one.
        tensorboard: write per-model scalars and HParams under ``<path>/tensorboard/``
            (``tensorboard --logdir <path>/tensorboard``). Default: if the package is installed.
        max_unit_failures: a model whose unit loses its worker (the process dies, e.g. out of
            memory) or cannot hand its new state over this many times in a row is marked
            failed; before that the unit runs again from the state it started from (on a
            replacement worker, for a lost one).
        early_stopping: a rule that prunes models at epoch boundaries, with any search, e.g.
            ``cerebro.MedianStopping()``. It is asked first, after each new epoch; the
            ``scheduler`` (or the search) decides the models it lets go on.
        checkpoint_dir: where each model's training state (between hops) and its epoch
            checkpoints live: default ``<path>/checkpoints``; any fsspec URL works too
            (``s3://bucket/run/checkpoints``, needs the filesystem's package, e.g. ``s3fs``).
            At a URL, every hop uploads and downloads the model's whole state: for large models
            prefer a local folder with ``checkpoint_mirror``.
        checkpoint_mirror: an fsspec URL (``s3://bucket/run``, ``file:///backup/run``) that
            keeps a copy of every epoch checkpoint (pruned with the local ones). A model whose
            own state and checkpoints are lost recovers from it.
        resume: what a rerun on a ``path`` holding this experiment does when ``build`` has
            changed. ``"auto"`` (default) continues it only if ``build`` makes the same models
            (same module tree, parameter shapes, optimizer and scheduler settings, loss, batch
            size, metrics, and the same code), and otherwise refuses, saying which configuration
            and field differ. ``"force"`` continues anyway: the recorded models' states are
            loaded into models built by the new ``build`` (which must be compatible with them),
            new models use it too, and it replaces the ``build.pkl`` kept at ``path``.
        scheduler: what the search's models do after each epoch (continue, pause, stop or
            exploit), e.g. ``cerebro.ASHA(max_epochs=9)``, ``cerebro.Hyperband(max_epochs=27)``,
            ``cerebro.PBT(perturb_every=2)`` or ``cerebro.MedianStopping()``: the search
            proposes, the scheduler decides (``search=TPESearch(space, 27),
            scheduler=ASHA(max_epochs=9)``). Default: the search decides (``ASHA(space, ...)``
            and the other adaptive searches given a space schedule their own models, and take
            no scheduler; grid, random and TPE search train every model to its end).
        fusion: train models of one shape together as one wide model: ``True``,
            ``cerebro.Fusion(max_models=..., memory_mb=...)`` for limits, or ``False`` (default).
            Models whose built specs match (an ``nn.Sequential`` of Linear, Conv2d, BatchNorm,
            pooling, Flatten, Dropout and activations with the same shapes, batch size, loss
            kind, metric names and optimizer class: SGD, Adam or AdamW) and that are at the
            same point of training hop as one unit; each keeps its own learning rate, weight
            decay, momentum, betas, eps, LR scheduler, dropout rate, BatchNorm statistics,
            random stream and row order, so it does the same SGD as alone (up to float32
            rounding). A model that cannot be fused trains alone, and the records say why
            (``events`` of kind ``not_fused``).
            In deterministic mode each epoch's shard order is shared by a fused cohort.
        materialize: for models whose spec has a ``frozen`` prefix (transfer learning): ``True``
            or ``cerebro.Materialize(budget_mb=..., memory_mb=...)`` computes the prefix's
            output once per shard on the worker that holds it, keeps it (under
            ``path/features``, by prefix and shard content) and trains every configuration and
            epoch on it; under a budget a MILP picks which depths to keep. Configurations that
            share a prefix hop together in one unit. ``False`` (default): the prefix runs on
            every batch. What was computed: ``Result.materialized``.
        durable_lag: how many hops a model's current state may run ahead of its state file
            (an integer >= 0). A model hops on as soon as its unit is done, its new state handed
            to the next worker in memory, while the state file is written behind it; a model
            this many hops ahead waits for its file, and an epoch ends only on a written one.
            A crash of the whole run costs at most this many hops per model (trained again on
            resume, with the same results in deterministic mode); 0 writes every state before
            its model hops on. A state file that cannot be written (disk full, read-only)
            warns once and stops the run only when a model reaches the bound.
        trackers: more listeners on the run, e.g. ``[cerebro.MLflowTracker()]`` (any
            :class:`cerebro.trackers.Tracker`); the progress display and TensorBoard are added
            by ``progress`` and ``tensorboard``.
        dashboard: serve the web dashboard while the run goes on (``True``: on 127.0.0.1:8300;
            an int: on that port, 0 for any free one); its URL, with the token, is printed
            when the run starts and kept as ``exp.dashboard_url``. A port in use is refused
            here, before any work. Needs ``pip install cerebro[dashboard]``.
        per_group: with a dataset prepared with ``group_by``, ``True`` trains every
            configuration the search proposes as one model per group, each trained and
            validated only on its group's shards, all scheduled together by MOP. The search
            and scheduler see one trial per configuration, whose metrics are the row-weighted
            mean over its groups (a ``val_*`` metric weighted by validation rows, a ``train_*``
            one by training rows); with a scheduler, a group model that finishes an epoch
            first waits for its configuration's other groups, and the decision applies to all;
            ``early_stopping`` compares a model with the other models of its group. Results:
            :attr:`Result.best_by_group`, and a ``group`` column in ``Result.history`` and
            ``Result.leaderboard()``. ``False`` (default): one model per configuration.

    With an adaptive search (:class:`cerebro.ASHA`, :class:`cerebro.Hyperband`, ...), ``epochs``
    is the most any model trains. While it runs, :func:`cerebro.control` (or the ``cerebro``
    command) stops, resumes, clones and adds models.

    Example:
        >>> exp = cerebro.Experiment(build, dataset=ds, search=cerebro.GridSearch(space),
        ...                          epochs=5, metric="val_accuracy", mode="max",
        ...                          backend=cerebro.LocalBackend(workers=2),
        ...                          path="runs/demo")                  # doctest: +SKIP
        >>> result = exp.run()                                         # doctest: +SKIP
        >>> result.best.params                                         # doctest: +SKIP
    """

    def __init__(
        self,
        build: Callable[[dict[str, Any]], ModelSpec],
        dataset: Dataset | str,
        search: Search,
        epochs: int = 1,
        metric: str = "val_loss",
        mode: str = "min",
        backend: Backend | None = None,
        path: str | os.PathLike | None = None,
        seed: int = 0,
        progress: bool = True,
        overwrite: bool = False,
        name: str | None = None,
        deterministic: bool = False,
        storage: str | None = None,
        max_unit_failures: int = 3,
        tensorboard: bool | None = None,
        keep_checkpoints: str | int = "last_and_best",
        early_stopping: EarlyStopping | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_mirror: str | None = None,
        resume: str = "auto",
        scheduler: Scheduler | None = None,
        fusion: bool | Fusion = False,
        materialize: bool | Materialize = False,
        durable_lag: int = 2,
        trackers: Sequence[Tracker] | None = None,
        dashboard: bool | int = False,
        per_group: bool = False,
    ) -> None:
        if not callable(build):
            raise ConfigError("build", build, "a function build(params) -> cerebro.ModelSpec")
        # Workers must be able to receive it: say now if they cannot. Kept as build.pkl too.
        self._build_payload = pickle_build(build)
        if isinstance(dataset, (str, os.PathLike)):
            dataset = Dataset.open(dataset)
        if not isinstance(dataset, Dataset):
            raise ConfigError("dataset", dataset, "a cerebro.Dataset or the path of one")
        if not isinstance(search, Search):
            raise ConfigError(
                "search",
                search,
                "a cerebro search such as GridSearch(space) or RandomSearch(space, n)",
                hint=(
                    f"{type(search).__name__} is a scheduler: pass it as scheduler= with a search"
                    if isinstance(search, Scheduler)
                    else ""
                ),
            )
        _check_search_and_scheduler(search, scheduler)
        epochs = check_int("epochs", epochs, minimum=1)
        if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
            raise ConfigError(
                "early_stopping", early_stopping, "None or a rule such as cerebro.MedianStopping()"
            )
        self.early_stopping = early_stopping
        self.scheduler = scheduler
        if mode not in ("min", "max"):
            raise ConfigError("mode", mode, "'min' or 'max'")
        if not isinstance(metric, str) or not metric.startswith(("train_", "val_")):
            raise ConfigError("metric", metric, "a name such as 'val_accuracy' or 'train_loss'")
        if metric.startswith("val_") and dataset.split_rows("val") == 0:
            raise ConfigError(
                "metric", metric, "a train_* metric: the dataset has no validation rows"
            )
        seed = check_int("seed", seed)
        self.max_unit_failures = check_int("max_unit_failures", max_unit_failures, minimum=1)
        self.keep_checkpoints = checkpoints.check_policy(keep_checkpoints)
        if tensorboard not in (None, True, False):
            raise ConfigError("tensorboard", tensorboard, "True, False or None (log if installed)")
        if tensorboard and not tensorboard_available():
            raise ConfigError(
                "tensorboard",
                True,
                "the tensorboard package installed",
                hint="pip install cerebro[tensorboard], or pass tensorboard=False",
            )
        self.tensorboard = tensorboard_available() if tensorboard is None else tensorboard
        check_bool("deterministic", deterministic)
        self.fusion = fusion_option(fusion)
        self.per_group = per_group_option(per_group, dataset)
        self.materialize = materialize_option(materialize)
        self.durable_lag = check_int("durable_lag", durable_lag, minimum=0, unit="hops")
        if not isinstance(resume, str) or resume not in ("auto", "force"):
            raise ConfigError(
                "resume",
                resume,
                "'auto' (continue the same experiment, refuse a changed build) or 'force' "
                "(continue the recorded models with the new build)",
            )
        if resume == "force" and overwrite:
            raise ConfigError(
                "resume", resume, "'auto' with overwrite=True", hint="overwrite starts afresh"
            )
        self.resume = resume
        self.trackers = _check_trackers(trackers)
        self.dashboard = _check_dashboard(dashboard)
        if backend is None:
            backend = LocalBackend(workers=min(2, dataset.num_shards))
        if not isinstance(backend, Backend):
            raise ConfigError(
                "backend", backend, "a cerebro backend such as LocalBackend(workers=2)"
            )
        backend.validate(dataset.num_shards)
        # Adaptive searches and schedulers check that they fit the experiment (e.g. max_epochs
        # <= epochs); a scheduler learns from the context what the search proposes.
        context = SearchContext(
            metric,
            mode,
            epochs,
            dataset.num_shards,
            backend.num_workers,
            num_models=search.num_models,
            space=search.space,
            scheduler_pauses=scheduler is not None and scheduler.pauses,
        )
        search.attach(context)
        if scheduler is not None:
            scheduler.attach(context)
        if early_stopping is not None:
            early_stopping.attach(context)
        self.build = build
        self.dataset = dataset
        self.search = search
        self.epochs = epochs
        self.metric = metric
        self.mode = mode
        self.backend = backend
        self.path = os.fspath(path) if path is not None else time.strftime("runs/exp-%Y%m%d-%H%M%S")
        self.seed = seed
        self.progress = progress
        self.overwrite = overwrite
        self.name = name or os.path.basename(os.path.normpath(self.path))
        self.deterministic = deterministic
        self._storage_given = storage
        if checkpoint_dir is None:
            self._checkpoint_dir = os.path.join(self.path, "checkpoints")
        elif isinstance(checkpoint_dir, (str, os.PathLike)):
            self._checkpoint_dir = files.as_local(os.fspath(checkpoint_dir)).rstrip("/")
        else:
            raise ConfigError("checkpoint_dir", checkpoint_dir, "a folder or an fsspec URL")
        if files.is_url(self._checkpoint_dir):
            checkpoints.check_writable("checkpoint_dir", self._checkpoint_dir)
        if checkpoint_mirror is not None and not isinstance(checkpoint_mirror, str):
            raise ConfigError("checkpoint_mirror", checkpoint_mirror, "an fsspec URL or None")
        self.checkpoint_mirror = (
            checkpoints.Mirror(checkpoint_mirror, self.checkpoint_dir)
            if checkpoint_mirror
            else None
        )
        if self.checkpoint_mirror is not None:
            checkpoints.check_writable("checkpoint_mirror", self.checkpoint_mirror.url)
        self.storage = normalize_url(storage) if storage is not None else None
        place.check_path(self.path, self._checkpoint_dir, self.storage is None, overwrite)
        # Every argument is good: let torch load for the workers while the user's code goes on.
        backend.prestart()

    @property
    def checkpoint_dir(self) -> str:
        return self._checkpoint_dir

    @property
    def storage_url(self) -> str:
        return self.storage if self.storage is not None else sqlite_url(self.path)

    def run(self) -> Result:
        """Train every model; returns the :class:`Result` (also kept in the records at ``path``).

        If ``path`` (or ``storage``, by name) already holds this same experiment, the run
        continues it from its records: completed models are not trained again, and models that
        were training go on from their last completed hop. In deterministic mode the final
        results equal those of a run that was never interrupted.

        Raises:
            ConfigError: before any worker starts or anything is recorded, if a configuration
                the search first proposes cannot train one step (each is tried on a few rows).
            AllModelsFailed: after the records are written, if every model failed.
        """
        if in_worker():
            raise RuntimeError(
                "Experiment.run() was called inside a cerebro worker, while it imported a module "
                "that build refers to; a module that runs an experiment when imported must not "
                "also define what build uses: move build (and what it uses) to another module, "
                'or run the experiment under `if __name__ == "__main__":`'
            )
        os.makedirs(self.path, exist_ok=True)
        self.backend.prestart()  # torch loads for the workers while the driver prepares
        with self._lock():
            earlier = self._claim_path()
            config = RunConfig(
                build=self.build,
                dataset=self.dataset,
                search=self.search,
                epochs=self.epochs,
                metric=self.metric,
                mode=self.mode,
                seed=self.seed,
                checkpoint_dir=self.checkpoint_dir,
                deterministic=self.deterministic,
                max_unit_failures=self.max_unit_failures,
                keep_checkpoints=self.keep_checkpoints,
                early_stopping=self.early_stopping,
                checkpoint_mirror=self.checkpoint_mirror,
                scheduler=self.scheduler,
                fusion=self.fusion,
                materialize=self.materialize,
                features_dir=(self.materialize and self.materialize.folder)
                or os.path.join(os.path.abspath(self.path), "features"),
                durable_lag=self.durable_lag,
                per_group=self.per_group,
            )
            trackers: list[Tracker] = [RunProgress(self.progress, self.metric, self.mode)]
            if self.tensorboard:
                trackers.append(TensorBoardLog(os.path.join(self.path, "tensorboard")))
            trackers += self.trackers
            if self.dashboard is not None:
                from ..dashboard import DashboardTracker

                served = DashboardTracker(self.path, port=self.dashboard)
                self.dashboard_url: str | None = served.url  # the page, with its token
                trackers.append(served)
            tracker = Trackers(trackers)
            driver = Driver(config, self.backend, tracker)
            store = None
            if earlier is not None:
                store = RecordStore(open_engine(self.storage_url), earlier["id"])
                store.note_lost_driver()  # we hold the lock: a 'running' driver before us died
                driver.restore(store)
            try:
                driver.prepare()  # raises ConfigError before anything new is written
                # A finished experiment run again (a notebook cell, a script) returns its result
                # without starting a worker, unless a person's request asks for more.
                idle = store is not None and not driver.needs_workers(store)
                if not idle:
                    driver.start_workers()
                if store is None:
                    recorded = self._record_config(driver.fingerprints)
                    store = RecordStore.create(self.storage_url, self.name, recorded)
                store.set_experiment_status(ExperimentStatus.RUNNING.value)
            except BaseException:
                self.backend.shutdown(graceful=False)
                tracker.run_finished()
                raise
            if idle:
                tracker.run_finished()
            else:
                try:
                    tracker.attach(self._run_info(store))
                    driver.run(store)
                except BaseException:
                    store.set_experiment_status(ExperimentStatus.INTERRUPTED.value)
                    raise
            store.set_experiment_status(ExperimentStatus.COMPLETED.value)
        _raise_if_every_model_failed(store, self.path)
        return Result(store, self.metric, self.mode, self.checkpoint_dir, self.build)

    def _run_info(self, store: RecordStore) -> RunInfo:
        row = store.experiment()
        return RunInfo(
            name=self.name,
            path=self.path,
            experiment_id=store.experiment_id,
            created=row["created"],
            metric=self.metric,
            mode=self.mode,
            epochs=self.epochs,
            checkpoint_dir=self.checkpoint_dir,
            store=store,
        )

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One driver per experiment path (released by the OS if this process dies)."""
        with open(os.path.join(self.path, ".lock"), "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    "path", self.path, "an experiment that no other process is running"
                ) from None
            yield

    def _claim_path(self) -> dict[str, Any] | None:
        """The earlier record of this experiment to continue, or None to start afresh.

        A place holding a different experiment is refused; ``overwrite=True`` deletes it.
        """
        held = place.survey(self.path, self.checkpoint_dir, own_records=self.storage is None)
        earlier = self._earlier_experiments() if held.records is None else []
        place.check_claim(held, bool(earlier), self.overwrite)  # checkpoints without records...
        if (earlier or held.cerebros) and self.overwrite:
            if self.storage is None:
                for suffix in ("", "-wal", "-shm"):  # SQLite's database and its WAL files
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(sqlite_file(self.path) + suffix)
            else:
                with closing_engine(self.storage_url) as engine:
                    for row in earlier:
                        RecordStore.delete_experiment(engine, row["id"])
            place.clear(self.path, self.checkpoint_dir)  # cerebro's files only, never a person's
            earlier = []
        if not earlier:
            self._keep_build()
            return None
        previous = earlier[-1]
        mine = self._record_config()
        # The checkpoints must be where the records say (it matters with shared storage).
        different = {
            key: (previous["config"].get(key), mine[key])
            for key in (*_IDENTITY, "checkpoint_dir")
            if previous["config"].get(key) != mine[key]
        }
        grown_from = self._grown_from(previous["config"])
        if grown_from is not None:
            del different["dataset_fingerprint"]
        if different:
            argument, value = ("storage", self._shown_url) if self.storage else ("path", self.path)
            shown = ", ".join(f"{k}: recorded {a!r}, now {b!r}" for k, (a, b) in different.items())
            raise ConfigError(
                argument,
                value,
                f"a place that holds no other experiment named {self.name!r}",
                hint=f"it holds a different one ({shown}); choose a new path or name, "
                "or pass overwrite=True to delete the old records",
            )
        self._check_build(previous)
        if grown_from is not None:
            self._record_growth(previous, grown_from)
        return previous

    def _grown_from(self, recorded: dict[str, Any]) -> DatasetVersion | None:
        """The version of the dataset the records were trained on, if the dataset now given is
        a later version of it (its first shards are that version's, byte for byte): the models
        may go on with the added shards. None if it is the same dataset or another one."""
        fingerprint = recorded.get("dataset_fingerprint")
        if fingerprint is None or fingerprint == self.dataset.fingerprint:
            return None
        return self.dataset.version_of(fingerprint)

    def _record_growth(self, previous: dict[str, Any], grown_from: DatasetVersion) -> None:
        """From now on the experiment is one of the grown dataset (an older version is refused
        as different); the event says when, so each epoch's version can be told from it and
        from the shards its hops visited."""
        now = self.dataset
        with closing_engine(self.storage_url) as engine:
            store = RecordStore(engine, previous["id"])
            store.update_config(
                dataset=now.path, dataset_fingerprint=now.fingerprint, dataset_version=now.version
            )
            store.add_event(
                EventKind.DATASET_GROWN.value,
                from_version=grown_from.version,
                version=now.version,
                from_fingerprint=grown_from.fingerprint,
                fingerprint=now.fingerprint,
                num_shards=now.num_shards,
            )
        previous["config"].update(dataset_fingerprint=now.fingerprint, dataset_version=now.version)

    def _check_build(self, previous: dict[str, Any]) -> None:
        """Continue ``previous`` only with the build its models were made by (``resume="force"``
        takes the new one). ``build.pkl`` is never replaced under recorded models otherwise."""
        difference, mine = identity.compare(previous["config"], self.build, self.seed)
        if difference is None:
            if not os.path.exists(os.path.join(self.path, BUILD_FILE)):
                self._keep_build()
            return
        if self.resume != "force":
            raise ConfigError(
                "build",
                self.build,
                "the build that made the models recorded at "
                + (self._shown_url if self.storage else repr(self.path)),
                hint=f"{difference}; pass overwrite=True to start a new experiment, or "
                'resume="force" to continue the recorded models with the new build',
            )
        warnings.warn(
            f'resume="force": {difference}; the recorded models go on with the new build',
            stacklevel=4,
        )
        self._keep_build()
        with closing_engine(self.storage_url) as engine:
            store = RecordStore(engine, previous["id"])
            store.update_config(**mine)
            store.add_event("build_replaced", difference=difference)

    def _keep_build(self) -> None:
        """Kept beside the records so that cerebro.load(path).load_model() works anywhere."""
        write_bytes_atomically(os.path.join(self.path, BUILD_FILE), self._build_payload)

    def _earlier_experiments(self) -> list[dict[str, Any]]:
        if self.storage is None and not os.path.exists(sqlite_file(self.path)):
            return []
        try:
            with closing_engine(self.storage_url) as engine:
                rows = RecordStore.list_experiments(engine)
        except SQLAlchemyError as e:
            raise ConfigError(
                "storage", self._shown_url, "a reachable database URL", hint=first_line(e)
            ) from e
        if self.storage is None:
            return rows
        return [r for r in rows if r["name"] == self.name]

    @property
    def _shown_url(self) -> str:
        return shown_url(self._storage_given or self.storage_url)

    def _record_config(self, built: identity.Fingerprints | None = None) -> dict[str, Any]:
        return {
            "dataset": self.dataset.path,
            "dataset_fingerprint": self.dataset.fingerprint,
            "dataset_version": self.dataset.version,
            "search": self.search.fingerprint(),
            "scheduler": self.scheduler.fingerprint() if self.scheduler is not None else None,
            "epochs": self.epochs,
            "metric": self.metric,
            "mode": self.mode,
            "seed": self.seed,
            "deterministic": self.deterministic,
            "fusion": dataclasses.asdict(self.fusion) if self.fusion is not None else None,
            # On or off changes results within float32 rounding; the budget only speed.
            "materialize": True if self.materialize is not None else None,
            "per_group": True if self.per_group else None,  # None: as records from before
            "command": _launch_command(),
            "path": os.path.abspath(self.path),
            "checkpoint_dir": (
                self.checkpoint_dir
                if files.is_url(self.checkpoint_dir)
                else os.path.abspath(self.checkpoint_dir)
            ),
            "backend": repr(self.backend),
            "space": describe_space(self.search.space) if self.search.space is not None else None,
            "early_stopping": repr(self.early_stopping) if self.early_stopping else None,
            "checkpoint_mirror": self.checkpoint_mirror.url if self.checkpoint_mirror else None,
            # What it trains (compared on a rerun, see identity.compare).
            "build_code": identity.code_fingerprint(self.build),
            "model_fingerprints": built.packed() if built is not None else None,
        }


@contextlib.contextmanager
def closing_engine(url: str) -> Iterator[Engine]:
    engine = open_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


# What makes two runs the same experiment (so that the second may continue the first). A key
# that records written before it existed lack reads as None ("scheduler": no scheduler).
_IDENTITY = (
    "dataset_fingerprint",
    "search",
    "scheduler",
    "epochs",
    "metric",
    "mode",
    "seed",
    "deterministic",
    "fusion",
    "materialize",
    "per_group",
)


def _check_search_and_scheduler(search: Search, scheduler: Any) -> None:
    """A search proposes, a scheduler decides: refuse the combinations that cannot mean that."""
    if not search.proposes:
        name = type(search).__name__
        raise ConfigError(
            "search",
            search,
            "a search that proposes configurations, such as RandomSearch(space, n) or "
            "TPESearch(space, n)",
            hint=f"{name} without a space is a scheduler: pass it as scheduler={name}(...) "
            f"with a search, e.g. search=RandomSearch(space, n), or give {name} a space",
        )
    if scheduler is None:
        return
    if not isinstance(scheduler, Scheduler):
        raise ConfigError(
            "scheduler",
            scheduler,
            "None or a scheduler such as cerebro.ASHA(max_epochs=9), cerebro.Hyperband("
            "max_epochs=27), cerebro.PBT(perturb_every=2) or cerebro.MedianStopping()",
        )
    if isinstance(scheduler, Search) and scheduler.proposes:
        name = type(scheduler).__name__
        raise ConfigError(
            "scheduler",
            scheduler,
            f"a scheduler that proposes nothing, such as {name}(max_epochs=...) without a space",
            hint=f"this {name} has a space and proposes its own models: pass it as search= "
            "without a scheduler, or drop its space",
        )
    if search.schedules:
        raise ConfigError(
            "scheduler",
            scheduler,
            f"None, because search={search!r} already schedules its models",
            hint="pass search=RandomSearch(space, n) or TPESearch(...) with scheduler=...",
        )


def _launch_command() -> dict[str, Any] | None:
    """How this process was started, so that ``cerebro resume`` can start it again (None from
    an interactive session, which has no script to rerun)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    script: str | None = getattr(main, "__file__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        argv = ["-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]]
    elif script:
        argv = [os.path.abspath(script), *sys.argv[1:]]
    else:
        return None
    return {"argv": argv, "cwd": os.getcwd()}


def _raise_if_every_model_failed(store: RecordStore, path: str) -> None:
    """A run in which models failed and none trained to its end raises (after its records are
    written), rather than return a result with nothing in it that anyone would notice."""
    models = store.models()
    failed = [m for m in models if m["status"] == FAILED]
    if not failed or any(m["status"] in (COMPLETED, PAUSED, PRUNED, STOPPED) for m in models):
        return
    first = failed[0]
    raise AllModelsFailed(
        f"{len(failed)} of {len(models)} models failed and none trained to its end; "
        f"the first, model {first['model_id']} with params {first['params']}, failed with:\n"
        f"{_excerpt(first['error'] or '(no error recorded)')}\n"
        f"Every model's error: cerebro.load({path!r}).models"
    )


def _excerpt(error: str, head: int = 3, tail: int = 2) -> str:
    """The first lines of an error, and its last (a traceback's exception) if it is long."""
    lines = error.strip().splitlines()
    if len(lines) <= head + tail + 1:
        return "\n".join(lines)
    return "\n".join([*lines[:head], "  ...", *lines[-tail:]])


def _check_trackers(trackers: Any) -> list[Tracker]:
    """``trackers=``: a list (or tuple) of Tracker instances, or None."""
    accepted = "None or a list of trackers, e.g. [cerebro.MLflowTracker()]"
    if trackers is None:
        return []
    if isinstance(trackers, Tracker):
        raise ConfigError("trackers", trackers, accepted, hint="put the tracker in a list")
    if not isinstance(trackers, (list, tuple)):
        raise ConfigError("trackers", trackers, accepted)
    for i, item in enumerate(trackers):
        if not isinstance(item, Tracker):
            hint = f"item {i} is a {type(item).__name__}, not a cerebro.trackers.Tracker"
            if isinstance(item, type) and issubclass(item, Tracker):
                hint = f"item {i} is the class {item.__name__}: pass an instance, {item.__name__}()"
            raise ConfigError("trackers", trackers, accepted, hint=hint)
    return list(trackers)


def _check_dashboard(dashboard: Any) -> int | None:
    """``dashboard=``: the port to serve on (None: no dashboard). A port in use is refused
    now, before any work."""
    if dashboard is False:
        return None
    if dashboard is True:
        from ..dashboard.server import DEFAULT_PORT

        port = DEFAULT_PORT
    elif is_int(dashboard) and 0 <= dashboard <= 65535:
        port = int(dashboard)
    else:
        raise ConfigError(
            "dashboard", dashboard, "True (port 8300), False, or a port number (0: any free one)"
        )
    from ..dashboard.server import DEFAULT_HOST, bind, check_available

    check_available()
    bind(DEFAULT_HOST, port).close()  # ConfigError if the port is in use
    return port
