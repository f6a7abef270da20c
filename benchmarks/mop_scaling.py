"""MOP scaling: the same configurations trained one after another in one process, then with
MOP on 1, 2, ... worker processes, in one run on one machine.

Reports, for each way of training:
- makespan: wall time of the whole call (for MOP: including starting the workers), and the
  training span (first hop start to last unit end) that the ratios below use;
- speedup over sequential training (same threads per process);
- busy fraction: time workers spent computing units / (workers x training span);
- per-hop overhead: mean time a worker is not computing between two consecutive units
  (bringing the next model's state in, the driver's round trip), as a fraction of a unit.

Two workloads: "scaling" (8 small MLPs) for speedup and busy fraction, and "overhead" (4 MLPs of
about 10M parameters) for the per-hop overhead goal. Every process uses 1 torch thread, so that
sequential and MOP differ only in how models and data are placed.

A second part ("hops") compares backends: the per-hop overhead of MLPs of about 1M, 10M and 100M
parameters on 2 workers, with LocalBackend (states handed over through shared memory) and
RayBackend (states through Ray's object store) in the same run, against the time to memcpy the
state once (measured in the same run). Ray runs on a simulated 2-node cluster
(``ray.cluster_utils.Cluster``, one worker per node, the driver on a head node with no CPUs), so
every state that changes worker crosses from one node's object store to the other's; and
"ray-1node" puts both workers on one node, where a state changes worker through its shared object
store. For Ray the floor of a hop on that cluster (a put on one worker's node, a get on the
other's, without cerebro) is measured in the same run.

Usage:
    python benchmarks/mop_scaling.py                 # both parts, 1 and 2 workers
    python benchmarks/mop_scaling.py --workers 1 2 4 8 --part scaling
    python benchmarks/mop_scaling.py --part hops     # local vs Ray (2 nodes, 1 node) per hop
    python benchmarks/mop_scaling.py --quick         # a smoke run (seconds), not for the table
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

import cerebro
from cerebro import training
from cerebro.backends.allocator import tune_malloc_for_training

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Workload:
    name: str
    features: int
    hidden: tuple[int, ...]
    rows_per_shard: int
    num_shards: int
    num_models: int
    epochs: int
    batch_size: int


WORKLOADS = {
    "scaling": Workload("scaling", 256, (1024, 512), 8192, 4, 8, 2, 64),
    "overhead": Workload("overhead", 1024, (3072, 2304), 768, 4, 4, 2, 64),
}
QUICK = {
    "scaling": Workload("scaling", 32, (64,), 256, 4, 4, 1, 64),
    "overhead": Workload("overhead", 64, (256,), 256, 2, 2, 1, 64),
}
# The backends part: model sizes of about 1M, 10M and 100M parameters, small shards (the
# overhead of a hop grows with the state, the unit with the rows).
HOP_WORKLOADS = {
    "1M": Workload("hops-1M", 512, (1536, 128), 512, 4, 2, 4, 64),
    "10M": Workload("hops-10M", 1024, (3072, 2304), 256, 4, 2, 4, 64),
    "100M": Workload("hops-100M", 1024, (8192, 8192, 3072), 128, 4, 2, 2, 64),
}
QUICK_HOPS = {"0.1M": Workload("hops-0.1M", 64, (256, 128), 128, 2, 2, 1, 64)}
BACKENDS = ("local", "ray", "ray-1node")


def build(params: dict[str, Any]) -> cerebro.ModelSpec:
    """An MLP whose sizes come from ``params`` (lr differs between configurations)."""
    sizes = [params["features"], *params["hidden"]]
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-1], 10))
    return cerebro.ModelSpec(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=params["lr"]),
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=params["batch_size"],
        metrics={"accuracy": cerebro.metrics.accuracy},
    )


def make_dataset(w: Workload, root: str) -> cerebro.Dataset:
    """Synthetic 10-class data labelled by a random linear teacher (learnable, not trivial)."""
    rng = np.random.default_rng(0)
    train_rows = w.rows_per_shard * w.num_shards
    rows = int(train_rows / 0.8)
    x = rng.normal(size=(rows, w.features)).astype(np.float32)
    y = (x @ rng.normal(size=(w.features, 10))).argmax(axis=1)
    return cerebro.prepare_data(
        {"x": x, "y": y}, os.path.join(root, w.name), num_shards=w.num_shards, validation=0.2
    )


def configurations(w: Workload) -> list[dict[str, Any]]:
    lrs = np.geomspace(1e-4, 1e-2, w.num_models)
    return [
        {
            "features": w.features,
            "hidden": list(w.hidden),
            "batch_size": w.batch_size,
            "lr": float(lr),
        }
        for lr in lrs
    ]


def run_sequential(w: Workload, dataset: cerebro.Dataset, threads: int) -> dict[str, Any]:
    """Each configuration in turn in this process: all shards in order, then validation."""
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    shards = [dataset.load_shard("train", s) for s in range(w.num_shards)]
    val = [dataset.load_shard("val", s) for s in range(w.num_shards)]
    start = time.perf_counter()
    compute = 0.0
    for model_id, params in enumerate(configurations(w)):
        spec = training.build_spec(build, params, training.init_seed(0, model_id))
        for epoch in range(w.epochs):
            for s in range(w.num_shards):
                t = time.perf_counter()
                training.run_train_hop(
                    spec,
                    shards[s],
                    training.shuffle_seed(0, model_id, epoch, s),
                    cpu,
                    s == w.num_shards - 1,
                )
                compute += time.perf_counter() - t
            for s in range(w.num_shards):
                t = time.perf_counter()
                training.run_eval_hop(spec, val[s], cpu)
                compute += time.perf_counter() - t
    elapsed = time.perf_counter() - start
    return {"makespan_s": elapsed, "span_s": elapsed, "busy": compute / elapsed}


def run_mop(
    w: Workload,
    dataset: cerebro.Dataset,
    workers: int,
    root: str,
    deterministic: bool = False,
    backend: cerebro.Backend | None = None,
    label: str = "",
) -> dict[str, Any]:
    search = cerebro.GridSearch({"cfg": cerebro.choice(list(range(w.num_models)))})
    configs = configurations(w)
    started = time.perf_counter()
    result = cerebro.Experiment(
        _ConfigBuild(configs),
        dataset,
        search,
        epochs=w.epochs,
        metric="val_loss",
        mode="min",
        backend=backend or cerebro.LocalBackend(workers=workers, threads_per_worker=1),
        path=os.path.join(root, f"{w.name}-mop-{workers}{'-det' * deterministic}{label}"),
        progress=False,
        deterministic=deterministic,
    ).run()
    makespan = time.perf_counter() - started
    failed = [m for m in result.models if m.status != "completed"]
    if failed:
        raise RuntimeError(f"models failed: {[m.error for m in failed]}")
    hops = result.hops
    span = hops.end.max() - hops.start.min()
    busy = (hops.end - hops.start).sum() / (workers * span)
    gaps, units = [], []
    for _, group in hops.sort_values("start").groupby("worker"):
        gaps += list(group.start.to_numpy()[1:] - group.end.to_numpy()[:-1])
    train = hops[hops.kind == "train"]
    units = (train.end - train.start).to_numpy()
    moved, stayed = hop_delays(hops)
    moved_later, _ = hop_delays(hops, from_epoch=1)
    return {
        "moved_s": float(np.mean(moved)) if moved else float("nan"),
        "moved_later_s": float(np.mean(moved_later)) if moved_later else float("nan"),
        "stayed_s": float(np.mean(stayed)) if stayed else float("nan"),
        "makespan_s": makespan,
        "span_s": span,
        "busy": busy,
        "overhead_s": float(np.mean(gaps)) if gaps else 0.0,
        "unit_s": float(np.mean(units)),
        "load_s": float(train.load_s.mean()),
        "save_s": float(train.save_s.mean()),
    }


def hop_delays(hops: pd.DataFrame, from_epoch: int = 0) -> tuple[list[float], list[float]]:
    """What each training hop added to the critical path: from the moment both its model
    (its last unit ended) and its worker (its last unit ended) were free to the start of its
    computation. The hops whose model came from another worker, then those that stayed
    (of epochs ``from_epoch`` on: 1 leaves out each model's first, where its first states
    are made and shared-memory files created)."""
    model_free: dict[int, tuple[float, int]] = {}
    worker_free: dict[int, float] = {}
    moved: list[float] = []
    stayed: list[float] = []
    for hop in hops.sort_values("start").itertuples():
        last = model_free.get(hop.model_id)
        counted = hop.kind == "train" and hop.epoch >= from_epoch
        if counted and last is not None and hop.worker in worker_free:
            delay = hop.start - max(last[0], worker_free[hop.worker])
            (moved if last[1] != hop.worker else stayed).append(delay)
        model_free[hop.model_id] = (hop.end, hop.worker)
        worker_free[hop.worker] = hop.end
    return moved, stayed


class _ConfigBuild:
    """``build`` for a grid over configuration indices (picklable, carries the configs)."""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        self.configs = configs

    def __call__(self, params: dict[str, Any]) -> cerebro.ModelSpec:
        return build(self.configs[params["cfg"]])


def parameters(w: Workload) -> int:
    spec = build(configurations(w)[0])
    return sum(p.numel() for p in spec.model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="tiny workloads, for a smoke test")
    parser.add_argument(
        "--workload", choices=sorted(WORKLOADS), nargs="+", default=sorted(WORKLOADS)
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument(
        "--part",
        choices=["scaling", "hops", "all"],
        default="all",
        help="scaling: MOP against sequential; hops: per-hop overhead of each backend",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        default=list(BACKENDS),
        help="backends the hops part compares (ray needs the cerebro[ray] extra)",
    )
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    # The same allocator settings as MOP's workers, so the baseline is not slowed by malloc.
    tune_malloc_for_training()
    too_many = [w for w in args.workers if w < 1 or w > cores]
    if too_many:
        parser.error(
            f"--workers {too_many}: each must be between 1 and this machine's {cores} cores"
        )
    if {"ray", "ray-1node"} & set(args.backends) and args.part != "scaling":
        try:
            import ray  # noqa: F401
        except ImportError:
            parser.error('--backends ray: Ray is not installed (pip install "cerebro[ray]")')
    if args.part in ("scaling", "all"):
        run_scaling(args, cores)
    if args.part in ("hops", "all"):
        run_hops(args)
    return 0


def run_scaling(args: argparse.Namespace, cores: int) -> None:
    """MOP on 1..W local workers against sequential training, on the scaling workloads."""
    workloads = QUICK if args.quick else WORKLOADS
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for w in (workloads[name] for name in sorted(args.workload, reverse=True)):
            dataset = make_dataset(w, root)
            worker_counts = [x for x in args.workers if x <= w.num_shards]
            seq = run_sequential(w, dataset, threads=1)
            rows.append(_row(w, "sequential, 1 thread", 1, seq, seq))
            if cores > 1:
                every = run_sequential(w, dataset, threads=cores)
                rows.append(_row(w, f"sequential, {cores} threads", 1, every, seq))
            for workers in worker_counts:
                label = f"MOP, {workers} worker{'s' * (workers > 1)}"
                mop = run_mop(w, dataset, workers, root)
                rows.append(_row(w, label, workers, mop, seq))
                if w.name == "scaling" and workers > 1:
                    det = run_mop(w, dataset, workers, root, deterministic=True)
                    rows.append(_row(w, label + ", deterministic", workers, det, seq))
            print(pd.DataFrame(rows).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        _write(table, workloads, args, os.path.join(args.out, "mop_scaling.md"))
        _plot(table, os.path.join(args.out, "mop_scaling.png"))


def run_hops(args: argparse.Namespace) -> None:
    """Per-hop overhead of each backend on 2 workers, for each model size, in one run."""
    workloads = QUICK_HOPS if args.quick else HOP_WORKLOADS
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for size, w in workloads.items():
            dataset = make_dataset(w, root)
            count = parameters(w)  # builds the model once: 100M parameters take a while
            for kind in args.backends:
                # The memcpy just before and just after the run: on a shared machine memory
                # bandwidth drifts over minutes (the faster one is kept: the ratios err high).
                before = memcpy_s(count * 3)  # weights + Adam's 2 moments, float32
                with _hop_backend(kind) as setup:
                    r = run_mop(w, dataset, 2, root, backend=setup.backend, label=f"-{kind}")
                    transfer = setup.transfer_s(count * 12) if setup.transfer_s else float("nan")
                memcpy = min(before, memcpy_s(count * 3))
                rows.append(
                    {
                        "model": size,
                        "parameters_M": round(count / 1e6, 2),
                        "state_MB": round(count * 12 / 1e6),  # weights + Adam's 2 moments
                        "backend": kind,
                        **_hop_costs(r),
                        "memcpy_s": round(memcpy, 4),
                        "overhead_vs_memcpy": round(r["overhead_s"] / memcpy, 2),
                        "moved_hop_s": round(r["moved_s"], 4),
                        "stayed_hop_s": round(r["stayed_s"], 4),
                        "moved_vs_memcpy": round(r["moved_s"] / memcpy, 2),
                        "moved_later_s": round(r["moved_later_s"], 4),
                        "later_vs_memcpy": round(r["moved_later_s"] / memcpy, 2),
                        "transfer_s": round(transfer, 4),
                        "later_vs_transfer": round(r["moved_later_s"] / transfer, 2),
                        "span_s": round(r["span_s"], 2),
                        "busy": round(r["busy"], 3),
                    }
                )
                print(pd.DataFrame(rows).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        _write_hops(table, workloads, args, os.path.join(args.out, "mop_hops.md"))
        _plot_hops(table, os.path.join(args.out, "mop_hops.png"))


def memcpy_s(floats: int, repeats: int = 5) -> float:
    """Seconds to copy ``floats`` float32 values from one buffer to another in this process on
    one thread, as a worker's: the floor of a hop that moves a state (best of ``repeats``)."""
    source, target = torch.rand(floats), torch.empty(floats)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            target.copy_(source)
            times.append(time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)
    return min(times)


@dataclass
class HopSetup:
    """A backend for the hops part and, for Ray, the floor of handing a state over on its
    cluster: seconds to put ``nbytes`` in one worker node's object store and get them on the
    node of the other worker (the same node for ``ray-1node``), without cerebro."""

    backend: cerebro.Backend
    transfer_s: Callable[[int], float] | None = None


@contextlib.contextmanager
def _hop_backend(kind: str) -> Iterator[HopSetup]:
    if kind == "local":
        yield HopSetup(cerebro.LocalBackend(workers=2, threads_per_worker=1))
        return
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    # The driver's head node has no CPUs: each worker gets a node ("ray": states cross between
    # the two nodes' object stores, over loopback TCP here, the network on a cluster), or both
    # share one ("ray-1node": a state changes worker through shared memory, as on a node with
    # several GPUs). Each node's object store gets 4 GiB, room for a few 100M-parameter states
    # (the simulated nodes' default, about 150 MB, would spill every state to disk; a real
    # node's is 30% of RAM).
    store = 4 * 2**30
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": store}
    )
    for _ in range(2 if kind == "ray" else 1):
        cluster.add_node(  # one node holds both workers' states: twice the room
            num_cpus=2 if kind == "ray-1node" else 1,
            object_store_memory=store * (2 if kind == "ray-1node" else 1),
        )
    cluster.wait_for_nodes()
    try:
        backend = cerebro.RayBackend(
            address=cluster.address,
            workers=2,
            threads_per_worker=1,
            runtime_env={"env_vars": {"PYTHONPATH": HERE}},  # actors import this script's build
        )
        yield HopSetup(backend, lambda nbytes: ray_transfer_s(cluster.address, nbytes))
    finally:
        ray.shutdown()
        cluster.shutdown()


def ray_transfer_s(address: str, nbytes: int, repeats: int = 3) -> float:
    """The floor of a Ray hop on the cluster at ``address``: put ``nbytes`` in the object store
    on the first worker node and get them on the last one (best of ``repeats``). Run after the
    experiment, with its workers gone."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.ERROR)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU"))
    probe: Any = ray.remote(num_cpus=0)(_Probe)  # Ray's actor classes have no stubs
    ends: list[Any] = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        for node in (nodes[0], nodes[-1])
    ]
    times = []
    for _ in range(repeats):
        stored, put_s = ray.get(ends[0].put.remote(nbytes))
        times.append(put_s + ray.get(ends[1].get.remote(stored)))
    for end in ends:
        ray.kill(end)
    return min(times)


class _Probe:
    """One end of :func:`ray_transfer_s`: an actor on a given node."""

    def put(self, nbytes: int) -> tuple[list[Any], float]:
        import ray

        array = np.ones(nbytes, dtype=np.uint8)
        began = time.perf_counter()
        ref = ray.put(array)
        return [ref], time.perf_counter() - began  # in a list: returned as a ref, not fetched

    def get(self, refs: list[Any]) -> float:
        import ray

        began = time.perf_counter()
        ray.get(refs[0])
        return time.perf_counter() - began


def _row(
    w: Workload, how: str, workers: int, r: dict[str, Any], seq: dict[str, Any]
) -> dict[str, Any]:
    row = {
        "workload": w.name,
        "how": how,
        "workers": workers,
        "makespan_s": round(r["makespan_s"], 2),
        "span_s": round(r["span_s"], 2),
        "speedup": round(seq["span_s"] / r["span_s"], 3),
        "speedup_per_worker": round(seq["span_s"] / r["span_s"] / workers, 3),
        "busy": round(r["busy"], 3),
    }
    if "overhead_s" in r:
        row.update(_hop_costs(r))
    return row


def _hop_costs(r: dict[str, Any]) -> dict[str, float]:
    """A MOP run's unit time and what a hop costs around it (columns of both tables)."""
    return {
        "unit_s": round(r["unit_s"], 3),
        "hop_overhead_s": round(r["overhead_s"], 4),
        "overhead_per_unit": round(r["overhead_s"] / r["unit_s"], 4),
        "state_load_s": round(r["load_s"], 4),
        "state_save_s": round(r["save_s"], 4),
    }


def _write(
    table: pd.DataFrame, workloads: dict[str, Workload], args: argparse.Namespace, path: str
) -> None:
    lines = [
        *_header("MOP scaling", f"--workers {' '.join(map(str, args.workers))}"),
        "Workloads (synthetic 10-class data, 20% validation, every process 1 torch thread):",
        "",
        *(_describe(w.name, w) for w in workloads.values()),
        "",
        "`span_s` is first unit start to last unit end (what speedup and busy use); `makespan_s` "
        "adds starting the worker processes. `hop_overhead_s` is the mean gap between two units "
        "on a worker; `overhead_per_unit` divides it by the mean training unit.",
        "",
        table.to_markdown(index=False),
        "",
    ]
    _save(lines, path)


def _write_hops(
    table: pd.DataFrame, workloads: dict[str, Workload], args: argparse.Namespace, path: str
) -> None:
    wide = table.pivot(index="model", columns="backend", values="hop_overhead_s")
    backends = " ".join(args.backends)
    lines = [
        *_header("Per-hop overhead by backend", f"--part hops --backends {backends}"),
        "2 workers, 1 torch thread each, free mode. `ray`: a simulated 2-node cluster on this "
        "machine (one worker per node), so states cross between object stores (over loopback "
        "TCP); `ray-1node`: both workers on one node, sharing its object store (as on a node "
        "with several GPUs). Models (synthetic 10-class data, Adam):",
        "",
        *(_describe(size, w) for size, w in workloads.items()),
        "",
        "`hop_overhead_s`: mean gap between two units on a worker (bringing the next model's "
        "state in, the driver's round trip); `state_load_s`: the part spent bringing a state in "
        "(0 when the worker still had the model); `state_save_s`: writing the new state "
        "(off the unit's path).",
        "",
        table.to_markdown(index=False),
        "",
    ]
    lines += [
        "`memcpy_s`: one copy of the state (weights and Adam's two moments, float32) from one "
        "buffer to another in one process on one thread, measured just before and just after "
        "each row's run (the faster of the two); "
        "`overhead_vs_memcpy` divides the hop overhead by it. Goals: local <= 2x, Ray <= 3x. "
        "The gap also counts a worker waiting for a model still training elsewhere (with 2 "
        "models on 2 workers they swap in lockstep), so `moved_hop_s` is what a hop adds to "
        "the critical path: from when both its model and its worker were free to the start "
        "of its computation, for hops that change worker (`stayed_hop_s`: those that do not); "
        "`moved_vs_memcpy` divides it by the memcpy. `moved_later_s` / `later_vs_memcpy`: the "
        "same for the hops after each model's first epoch, once its shared-memory slot files "
        "exist (a model's first hops create them: the kernel allocates and zeroes their "
        "pages, about 9x a memcpy).",
        "",
        "`transfer_s` (Ray): the floor of a hop on that cluster without cerebro, measured in "
        "the same run: `ray.put` of the state's bytes on one worker's node and `ray.get` of "
        "them on the other's (the same node for `ray-1node`); `later_vs_transfer` divides "
        "`moved_later_s` by it. Between two nodes the object store's transfer alone costs "
        "15-45x a memcpy here, so the Ray goal (3x a memcpy) is out of reach across nodes on "
        "this machine; the table shows how far the hop is from that floor.",
        "",
    ]
    if {"local", "ray"} <= set(wide.columns):
        ratio = (wide["ray"] / wide["local"]).round(2)
        lines += [
            "Ray's per-hop overhead over the local backend's: "
            + ", ".join(f"{size} {ratio[size]}x" for size in workloads if size in ratio.index),
            "",
        ]
    _save(lines, path)


def _header(title: str, options: str) -> list[str]:
    """A results file's title, the command that wrote it and the machine it ran on."""
    return [
        f"# {title}",
        "",
        f"Command: `python benchmarks/mop_scaling.py {options}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}; date {time.strftime('%Y-%m-%d')}",
        "",
    ]


def _describe(label: str, w: Workload) -> str:
    """One workload as a bullet: its models, data and epochs."""
    return (
        f"- **{label}**: {w.num_models} MLPs {w.features}-{'-'.join(map(str, w.hidden))}-10 "
        f"({parameters(w) / 1e6:.2f}M parameters), {w.num_shards} shards x {w.rows_per_shard} "
        f"rows, {w.epochs} epochs, batch {w.batch_size}"
    )


def _save(lines: list[str], path: str) -> None:
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _plot_hops(table: pd.DataFrame, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = list(dict.fromkeys(table.model))
    width = 0.8 / table.backend.nunique()
    for i, (kind, group) in enumerate(table.groupby("backend")):
        group = group.set_index("model").loc[sizes]
        xs = np.arange(len(sizes)) + i * width
        ax.bar(xs, group.overhead_per_unit * 100, width, label=kind)
    ax.set_xticks(np.arange(len(sizes)) + width * (table.backend.nunique() - 1) / 2, sizes)
    ax.set(xlabel="model size (parameters)", ylabel="hop overhead, % of a unit")
    ax.set_title("Per-hop overhead by backend (2 workers)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot(table: pd.DataFrame, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mop = table[table.how.str.startswith("MOP") & ~table.how.str.endswith("deterministic")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, group in mop.groupby("workload"):
        axes[0].plot(group.workers, group.speedup, "o-", label=name)
        axes[1].plot(group.workers, group.busy, "o-", label=name)
    top = max(mop.workers.max(), 2)
    axes[0].plot([1, top], [1, top], "k--", lw=0.8, label="ideal")
    axes[0].set(xlabel="workers", ylabel="speedup over sequential", title="MOP speedup")
    axes[1].axhline(0.95, color="k", ls="--", lw=0.8, label="goal 0.95")
    axes[1].set(
        xlabel="workers", ylabel="busy fraction", ylim=(0, 1.05), title="Worker busy fraction"
    )
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
