"""One runner per way of training the workload. ``run_approach`` is the entry point of a fresh
(spawned) process per approach, so that the memory of each approach is that process and its
descendants only, and no approach inherits another's warm caches.

Every runner returns the same record: makespan (from just before its workers or data are set
up to the last result in hand), the seconds workers spent computing units, when the first unit
started, the pids of the processes that trained (for their peak memory), the bytes of data each
one loaded, and the history (metrics per epoch) of every configuration.

Every training process uses one torch thread and glibc's malloc tuned as in MOP's workers
(``tune_malloc_for_training``), so that the approaches differ only in where models and data are
and how they are combined.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from cerebro.backends.allocator import tune_malloc_for_training

from .workload import (
    SEED,
    Data,
    Workload,
    epoch_metrics,
    hop_rng_seed,
    load_data,
    peak_rss_kib,
    shard_order,
    train_config,
)


@dataclass(frozen=True)
class Settings:
    """What every runner needs; picklable, sent to each spawned runner and worker."""

    workload: Workload
    dataset_path: str
    workers: int
    device: str  # "cpu" or "cuda"
    root: str  # a scratch folder for experiment records, Ray's files...
    shard_nbytes: dict[int, int] = field(default_factory=dict)  # train + val bytes per shard


@dataclass
class Run:
    """What one approach measured (memory is added by the parent's monitor)."""

    approach: str
    workers: int
    makespan_s: float = 0.0
    compute_s: float = 0.0
    startup_s: float = 0.0
    worker_pids: list[int] = field(default_factory=list)
    worker_rss_kib: dict[int, int] = field(default_factory=dict)  # self-reported VmHWM
    data_bytes: list[int] = field(default_factory=list)  # per worker
    history: dict[int, list[dict[str, float]]] = field(default_factory=dict)  # config -> epochs
    note: str = ""
    skipped: str = ""
    error: str = ""


def run_approach(name: str, settings: Settings, conn: Any) -> None:
    """Entry point of a runner process: run one approach and send its :class:`Run` back."""
    torch.set_num_threads(1)
    tune_malloc_for_training()
    try:
        run = RUNNERS[name](settings)
    except Exception:
        run = Run(name, settings.workers, error=traceback.format_exc())
    conn.send(run)
    conn.close()


# -- helpers --------------------------------------------------------------------------------


def _device(settings: Settings, index: int) -> torch.device:
    if settings.device == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", index % max(torch.cuda.device_count(), 1))


def _all_shards(settings: Settings) -> list[int]:
    return list(range(settings.workload.num_shards))


def _own_shards(settings: Settings, rank: int) -> list[int]:
    """Round-robin placement, the same as MOP's (``place_shards``)."""
    return list(range(rank, settings.workload.num_shards, settings.workers))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(target: Any, settings: Settings, extra: tuple[Any, ...]) -> tuple[list[Any], Any]:
    """Start ``settings.workers`` spawned processes ``target(rank, settings, *extra, results)``."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(rank, settings, *extra, results), daemon=True)
        for rank in range(settings.workers)
    ]
    for p in procs:
        p.start()
    return procs, results


def _collect(procs: list[Any], results: Any) -> list[dict[str, Any]]:
    """One report per worker; fails clearly if a worker died without reporting."""
    reports: list[dict[str, Any]] = []
    while len(reports) < len(procs):
        try:
            report = results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if not p.is_alive() and p.exitcode != 0]
            if dead:
                raise RuntimeError(
                    f"worker pid {dead[0].pid} exited with {dead[0].exitcode}"
                ) from None
            continue
        if "error" in report:
            raise RuntimeError(f"worker {report['rank']} failed:\n{report['error']}")
        reports.append(report)
    for p in procs:
        p.join()
    return reports


def _worker_setup(settings: Settings, rank: int) -> torch.device:
    torch.set_num_threads(1)
    tune_malloc_for_training()
    device = _device(settings, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _finish(run: Run, reports: list[dict[str, Any]], t0: float) -> Run:
    run.makespan_s = time.time() - t0
    for r in sorted(reports, key=lambda r: r["rank"]):
        run.worker_pids.append(r["pid"])
        run.worker_rss_kib[r["pid"]] = r["rss_kib"]
        run.data_bytes.append(r["data_bytes"])
        run.compute_s += r["compute_s"]
        for cfg, hist in r.get("history", {}).items():
            run.history[cfg] = hist
    run.startup_s = min(r["first_start"] for r in reports) - t0
    return run


# -- 1. sequential --------------------------------------------------------------------------


def run_sequential(settings: Settings) -> Run:
    """This process trains every configuration in turn, over all shards."""
    w = settings.workload
    t0 = time.time()
    device = _device(settings, 0)
    data = load_data(settings.dataset_path, _all_shards(settings), device)
    run = Run("sequential", 1, worker_pids=[os.getpid()], data_bytes=[data.nbytes])
    firsts = []
    for cfg, params in enumerate(w.configs):
        history, compute, first = train_config(params, cfg, data, w.epochs, device)
        run.history[cfg] = history
        run.compute_s += compute
        firsts.append(first)
    run.makespan_s = time.time() - t0
    run.startup_s = firsts[0] - t0
    run.worker_rss_kib[os.getpid()] = peak_rss_kib()
    run.note = "the baseline: MOP's deterministic shard order and seeds, one process"
    return run


# -- 2. task parallelism --------------------------------------------------------------------


def run_task_parallel(settings: Settings) -> Run:
    """W processes, each with the full data, take whole configurations from a shared queue
    (what Ray Tune and Optuna do on one machine)."""
    import multiprocessing as mp

    t0 = time.time()
    tasks = mp.get_context("spawn").Queue()
    for cfg in range(len(settings.workload.configs)):
        tasks.put(cfg)
    for _ in range(settings.workers):
        tasks.put(None)
    procs, results = _spawn(_task_worker, settings, (tasks,))
    run = _finish(Run("task_parallel", settings.workers), _collect(procs, results), t0)
    run.note = "full data per worker; whole configurations from a queue"
    return run


def _task_worker(rank: int, settings: Settings, tasks: Any, results: Any) -> None:
    try:
        device = _worker_setup(settings, rank)
        w = settings.workload
        data = load_data(settings.dataset_path, _all_shards(settings), device)
        history, compute, firsts = {}, 0.0, [time.time()]
        while (cfg := tasks.get()) is not None:
            history[cfg], seconds, first = train_config(w.configs[cfg], cfg, data, w.epochs, device)
            compute += seconds
            firsts.append(first)
        results.put(_report(rank, history, compute, min(firsts[1:], default=firsts[0]), data))
    except Exception:
        results.put({"rank": rank, "error": traceback.format_exc()})


def _report(
    rank: int, history: dict[int, Any], compute: float, first: float | None, data: Data
) -> dict[str, Any]:
    """What a training process sends back: its results, time, data and peak memory."""
    return {
        "rank": rank,
        "pid": os.getpid(),
        "history": history,
        "compute_s": compute,
        "first_start": first,
        "data_bytes": data.nbytes,
        "rss_kib": peak_rss_kib(),
    }


# -- 3. DDP ---------------------------------------------------------------------------------


def run_ddp(settings: Settings) -> Run:
    """torch.distributed DDP: W processes train one configuration at a time, each global
    batch split across them and gradients all-reduced after every backward pass."""
    t0 = time.time()
    procs, results = _spawn(_ddp_worker, settings, (_free_port(),))
    run = _finish(Run("ddp", settings.workers), _collect(procs, results), t0)
    run.note = "every rank holds the full data (as a DistributedSampler over one dataset does)"
    return run


def _init_group(settings: Settings, rank: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "nccl" if settings.device == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=settings.workers,
    )


def _gather_sums(by_shard: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    """Per-shard metric sums of every rank, added shard by shard (ranks in order)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, by_shard)
    out: dict[int, dict[str, float]] = {}
    for part in gathered:
        for s, sums in part.items():
            into = out.setdefault(s, {})
            for k, v in sums.items():
                into[k] = into.get(k, 0.0) + v
    return out


def _ddp_worker(rank: int, settings: Settings, port: int, results: Any) -> None:
    try:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from cerebro import training

        from .workload import build

        device = _worker_setup(settings, rank)
        _init_group(settings, rank, port)
        w, world = settings.workload, settings.workers
        data = load_data(settings.dataset_path, _all_shards(settings), device)
        rows = _rows(data)
        my_val = _own_shards(settings, rank)
        history: dict[int, list[dict[str, float]]] = {}
        compute, first = 0.0, None
        for cfg, params in enumerate(w.configs):
            spec = training.build_spec(build, params, training.init_seed(SEED, cfg))
            spec.model.to(device)
            ddp = DistributedDataParallel(
                spec.model, device_ids=[device.index] if device.type == "cuda" else None
            )
            history[cfg] = []
            for epoch in range(w.epochs):
                first = first or time.time()
                start = time.perf_counter()
                train = {}
                for s in shard_order(cfg, epoch, w.num_shards):
                    # Dropout masks: one stream per rank (each rank sees different rows).
                    torch.manual_seed(hop_rng_seed(cfg, epoch, s) + rank)
                    train[s] = _ddp_train_shard(
                        ddp, spec, data, s, training.shuffle_seed(SEED, cfg, epoch, s), rank, world
                    )
                if spec.lr_scheduler is not None and spec.lr_scheduler_interval == "epoch":
                    spec.lr_scheduler.step()
                val = {s: training.run_eval_hop(spec, data.val[s], device).sums for s in my_val}
                compute += time.perf_counter() - start
                metrics = epoch_metrics(_gather_sums(train), _gather_sums(val), rows)
                history[cfg].append({"epoch": epoch, **metrics})
        # Every rank holds the same history: rank 0 reports it.
        results.put(_report(rank, history if rank == 0 else {}, compute, first, data))
        dist.destroy_process_group()
    except Exception:
        results.put({"rank": rank, "error": traceback.format_exc()})


def _rows(data: Data) -> dict[str, dict[int, int]]:
    return {
        "train": {s: d.rows for s, d in data.train.items()},
        "val": {s: d.rows for s, d in data.val.items()},
    }


def _ddp_train_shard(
    ddp: Any, spec: Any, data: Data, s: int, seed: int, rank: int, world: int
) -> dict[str, float]:
    """One shard's global batches, in the row order sequential training uses; this rank
    trains on its slice of each. Returns this rank's row-weighted loss and metric sums."""
    shard = data.train[s]
    order = torch.randperm(shard.rows, generator=torch.Generator().manual_seed(seed))
    order = order.to(shard.x.device)
    # Sums stay on the device: one host synchronisation per shard, not per batch.
    sums = {
        name: torch.zeros((), dtype=torch.float64, device=shard.x.device)
        for name in spec.metric_names()
    }
    for start in range(0, shard.rows, spec.batch_size):
        parts = torch.tensor_split(order[start : start + spec.batch_size], world)
        if any(len(p) == 0 for p in parts):
            continue  # a last batch of fewer rows than ranks cannot be split: all ranks skip it
        index = parts[rank]
        inputs, targets = shard.x.index_select(0, index), shard.y.index_select(0, index)
        outputs = ddp(inputs)
        loss = spec.loss(outputs, targets)
        spec.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients of all ranks here
        spec.optimizer.step()
        if spec.lr_scheduler is not None and spec.lr_scheduler_interval == "batch":
            spec.lr_scheduler.step()
        with torch.no_grad():
            sums["loss"] += loss.detach().double() * len(index)
            for name, fn in spec.metrics.items():
                sums[name] += torch.as_tensor(fn(outputs, targets)).double() * len(index)
    return {name: float(v) for name, v in sums.items()}


# -- 4. Ray Tune ----------------------------------------------------------------------------


def run_ray_tune(settings: Settings) -> Run:
    """Ray Tune with W concurrent trials, one CPU (or GPU share) each; every trial loads the
    full data and trains one configuration as the sequential baseline does."""
    try:
        import ray
        from ray import tune
    except ImportError as e:
        return Run("ray_tune", settings.workers, skipped=f"ray[tune] not installed ({e})")
    # Ray's workers import this package by name, like any module-level trainable.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 is then silent
    # A short private folder: Ray's socket paths must stay short, and another Ray on this
    # machine (tests, a cluster) must neither be joined nor disturbed.
    temp = tempfile.mkdtemp(prefix="cmp-ray-", dir="/tmp")
    gpus = torch.cuda.device_count() if settings.device == "cuda" else 0
    t0 = time.time()
    try:
        ray.init(
            address="local",
            num_cpus=settings.workers,
            num_gpus=gpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            _temp_dir=temp,
        )
        resources = {"cpu": 1, "gpu": gpus / settings.workers} if gpus else {"cpu": 1}
        trainable = tune.with_resources(
            tune.with_parameters(ray_trainable, settings=settings), resources
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"cfg": tune.grid_search(list(range(len(settings.workload.configs))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=settings.workers, reuse_actors=True),
            run_config=tune.RunConfig(
                storage_path=os.path.join(settings.root, "ray-results"), name="compare", verbose=0
            ),
        )
        grid = tuner.fit()
        makespan = time.time() - t0
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    run = Run("ray_tune", settings.workers, makespan_s=makespan)
    run.note = "reuse_actors=True; makespan includes ray.init"
    firsts, per_pid = [], {}
    for result in grid:
        if result.error is not None:
            raise RuntimeError(f"trial {result.config} failed: {result.error}")
        frame = result.metrics_dataframe.sort_values("epoch")
        last = frame.iloc[-1]
        cfg = int(result.config["cfg"])
        keep = [c for c in frame.columns if c.startswith(("train_", "val_"))]
        run.history[cfg] = [
            {"epoch": int(row.epoch), **{c: float(row[c]) for c in keep}}
            for _, row in frame.iterrows()
        ]
        pid = int(last["pid"])
        # Reused actors run several trials: a process's data counts once.
        seen = per_pid.setdefault(pid, {"rss": 0, "data": 0})
        seen["rss"] = max(seen["rss"], int(last["rss_kib"]))
        seen["data"] = max(seen["data"], int(last["data_bytes"]))
        run.compute_s += float(last["compute_s"])
        firsts.append(float(last["first_start"]))
    run.worker_pids = sorted(per_pid)
    run.worker_rss_kib = {pid: v["rss"] for pid, v in per_pid.items()}
    run.data_bytes = [per_pid[pid]["data"] for pid in run.worker_pids]
    run.startup_s = min(firsts) - t0
    return run


def ray_trainable(config: dict[str, Any], settings: Settings) -> None:
    """A Ray Tune function trainable: one configuration, reported after every epoch."""
    from ray import tune

    torch.set_num_threads(1)
    tune_malloc_for_training()
    device = _device(settings, 0)  # Ray restricts each trial to its GPU share
    w = settings.workload
    cfg = int(config["cfg"])
    data = load_data(settings.dataset_path, _all_shards(settings), device)
    compute = {"s": 0.0, "mark": time.perf_counter(), "first": time.time()}

    def report(epoch: int, metrics: dict[str, float]) -> None:
        # Time between reports is training and validation only: reporting is not counted.
        compute["s"] += time.perf_counter() - compute["mark"]
        tune.report(
            {
                **metrics,
                "pid": os.getpid(),
                "rss_kib": peak_rss_kib(),
                "data_bytes": data.nbytes,
                "compute_s": compute["s"],
                "first_start": compute["first"],
            }
        )
        compute["mark"] = time.perf_counter()

    train_config(w.configs[cfg], cfg, data, w.epochs, device, on_epoch=report)


# -- 5. model averaging ---------------------------------------------------------------------


def run_model_averaging(settings: Settings) -> Run:
    """W processes, each with its own shards, train the same configuration at once and
    average their weights after every epoch (the MADlib / Spark-era approach)."""
    t0 = time.time()
    procs, results = _spawn(_averaging_worker, settings, (_free_port(),))
    run = _finish(Run("model_averaging", settings.workers), _collect(procs, results), t0)
    run.note = "weights averaged after every epoch; optimizer state stays local"
    return run


def _averaging_worker(rank: int, settings: Settings, port: int, results: Any) -> None:
    try:
        import torch.distributed as dist

        from cerebro import training

        from .workload import build

        device = _worker_setup(settings, rank)
        _init_group(settings, rank, port)
        w, world = settings.workload, settings.workers
        mine = _own_shards(settings, rank)
        data = load_data(settings.dataset_path, mine, device)
        rows = _rows(data)
        rows = {  # every rank's rows, for the means over all shards
            split: {s: r for part in _all_gather(by) for s, r in part.items()}
            for split, by in rows.items()
        }
        history: dict[int, list[dict[str, float]]] = {}
        compute, first = 0.0, None
        for cfg, params in enumerate(w.configs):
            spec = training.build_spec(build, params, training.init_seed(SEED, cfg))
            spec.model.to(device)
            history[cfg] = []
            for epoch in range(w.epochs):
                first = first or time.time()
                start = time.perf_counter()
                order = [s for s in shard_order(cfg, epoch, w.num_shards) if s in mine]
                train = {}
                for i, s in enumerate(order):
                    torch.manual_seed(hop_rng_seed(cfg, epoch, s))
                    train[s] = training.run_train_hop(
                        spec,
                        data.train[s],
                        training.shuffle_seed(SEED, cfg, epoch, s),
                        device,
                        end_of_epoch=i == len(order) - 1,
                    ).sums
                with torch.no_grad():
                    for t in spec.model.state_dict().values():
                        if t.is_floating_point():
                            dist.all_reduce(t)
                            t /= world
                val = {s: training.run_eval_hop(spec, data.val[s], device).sums for s in mine}
                compute += time.perf_counter() - start
                metrics = epoch_metrics(_gather_sums(train), _gather_sums(val), rows)
                history[cfg].append({"epoch": epoch, **metrics})
        # Every rank holds the same history: rank 0 reports it.
        results.put(_report(rank, history if rank == 0 else {}, compute, first, data))
        dist.destroy_process_group()
    except Exception:
        results.put({"rank": rank, "error": traceback.format_exc()})


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -- 6. MOP ---------------------------------------------------------------------------------


def run_mop(settings: Settings, deterministic: bool = False) -> Run:
    """Cerebro's MOP on a LocalBackend of W workers, each holding 1/W of the shards."""
    import cerebro

    from .workload import ConfigBuild

    w = settings.workload
    name = "mop_deterministic" if deterministic else "mop"
    devices = None
    if settings.device == "cuda":
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    backend = cerebro.LocalBackend(workers=settings.workers, devices=devices, threads_per_worker=1)
    pids: set[int] = set()
    done = threading.Event()

    def watch() -> None:  # the workers' pids, for the parent's memory monitor
        while not done.is_set():
            with contextlib.suppress(AttributeError):  # None while a worker is launched
                pids.update(backend.pids())
            done.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    t0 = time.time()
    watcher.start()
    try:
        result = cerebro.Experiment(
            ConfigBuild(w.configs),
            settings.dataset_path,
            cerebro.GridSearch({"cfg": cerebro.choice(list(range(len(w.configs))))}),
            epochs=w.epochs,
            metric="val_loss",
            mode="min",
            backend=backend,
            path=os.path.join(settings.root, name),
            seed=SEED,
            progress=False,
            deterministic=deterministic,
            tensorboard=False,
        ).run()
        makespan = time.time() - t0
    finally:
        done.set()
        watcher.join()
    failed = [m for m in result.models if m.status != "completed"]
    if failed:
        raise RuntimeError(f"models failed: {[m.error for m in failed]}")
    hops = result.hops
    created = float(result.experiment["created"])
    run = Run(name, settings.workers, makespan_s=makespan)
    run.note = (
        "shard order and seeds fixed per (model, epoch)"
        if deterministic
        else "free mode: shard order follows timing, so it is not sequential's"
    )
    run.compute_s = float((hops.end - hops.start).sum())
    run.startup_s = created + float(hops.start.min()) - t0
    run.worker_pids = sorted(pids)
    # Bytes each worker held: the shards its hops used (both splits of each).
    for _, group in hops.groupby("worker"):
        run.data_bytes.append(sum(settings.shard_nbytes[int(s)] for s in set(group.shard)))
    for m in result.models:
        cfg = int(m.params["cfg"])
        run.history[cfg] = [
            {"epoch": int(h["epoch"]), **{k: v for k, v in h.items() if k != "epoch"}}
            for h in m.history
        ]
    return run


def run_mop_deterministic(settings: Settings) -> Run:
    return run_mop(settings, deterministic=True)


RUNNERS = {
    "sequential": run_sequential,
    "task_parallel": run_task_parallel,
    "ddp": run_ddp,
    "ray_tune": run_ray_tune,
    "model_averaging": run_model_averaging,
    "mop": run_mop,
    "mop_deterministic": run_mop_deterministic,
}
