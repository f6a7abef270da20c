"""RayBackend on a simulated multi-node cluster (``ray.cluster_utils.Cluster``: separate raylets
and object stores on this machine), plus what only Ray has: placement over nodes by data
locality, losing a whole node, and the errors for addresses, capacity and unreadable data.

The backend-independent behaviour (MOP invariants, equivalence, recovery from a killed worker,
bit-identical deterministic results) is tested for both backends in the other test modules.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import builders
import pytest
from conftest import assert_same_results, state_equal, wait_for_train_hops
from test_experiment import _check_hop_invariants

import cerebro
from cerebro.backends import ray_backend

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
SPACE = {"lr": cerebro.choice([0.003, 0.03]), "dropout": cerebro.choice([0.0, 0.2])}


def _experiment(digits, path, backend, build=builders.slow_mlp) -> cerebro.Experiment:
    return cerebro.Experiment(
        build,
        digits,
        cerebro.GridSearch(SPACE),
        epochs=2,
        metric="val_accuracy",
        mode="max",
        backend=backend,
        path=path,
        seed=3,
        progress=False,
        deterministic=True,
    )


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """The same deterministic experiment on local worker processes."""
    path = tmp_path_factory.mktemp("local") / "run"
    return _experiment(digits, path, cerebro.LocalBackend(workers=2)).run()


@pytest.fixture
def cluster():
    """A head node and two worker nodes of 1 CPU each: 2 workers leave one node spare."""
    ray.shutdown()  # another module's local Ray: one process joins one cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _cluster_backend(cluster, **options) -> cerebro.RayBackend:
    # Actors on a cluster import what the runtime environment ships: here, the tests' builders.
    return cerebro.RayBackend(
        address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": TESTS}}, **options
    )


def _assert_same_results(result, reference):
    assert {m.status for m in result.models} == {"completed"}
    assert_same_results(result, reference)


@pytest.mark.slow  # 30 s with its cluster (the default run stays under 10 minutes)
def test_a_model_selection_runs_end_to_end_across_three_nodes(cluster, digits, tmp_path, reference):
    backend = _cluster_backend(cluster, workers=2)
    result = _experiment(digits, tmp_path / "run", backend).run()

    _assert_same_results(result, reference)  # bit-identical to local worker processes
    _check_hop_invariants(result.hops, digits.num_shards, digits.num_shards)
    assert set(result.hops.worker) == {0, 1}


def test_workers_are_spread_over_nodes(cluster, digits, tmp_path):
    backend = _cluster_backend(cluster, workers=3)
    backend.validate(digits.num_shards)
    infos = backend.start(
        digits.path, {0: frozenset({0, 1}), 1: frozenset({2}), 2: frozenset({3})}, builders.mlp
    )
    try:
        assert len(set(backend.nodes())) == 3
        assert [i.shards for i in infos] == [frozenset({0, 1}), frozenset({2}), frozenset({3})]
        assert sum(i.bytes_loaded for i in infos) > 0
        # Each worker's model cache is a share of its node (one worker on each node here).
        memory = {n["NodeID"]: n["Resources"]["memory"] for n in ray.nodes() if n["Alive"]}
        expected = [ray_backend.default_cache_mb(memory[node], 1) for node in backend.nodes()]
        assert [c.model_cache_mb for c in backend._configs] == expected
        assert min(expected) >= 1024
    finally:
        backend.shutdown()


@pytest.mark.slow  # 40 s: a node stopped mid-run (the default run stays under 10 minutes)
def test_losing_a_node_mid_run_gives_identical_results(cluster, digits, tmp_path, reference):
    backend = _cluster_backend(cluster, workers=2)
    path = tmp_path / "run"
    removed = []

    def remove_a_workers_node_mid_run():
        if wait_for_train_hops(path, 10, timeout=180):
            head = cluster.head_node.node_id
            worker_nodes = [n for n in backend.nodes() if n != head]
            node = next(n for n in cluster.list_all_nodes() if n.node_id == worker_nodes[0])
            cluster.remove_node(node, allow_graceful=False)
            removed.append(node.node_id)

    remover = threading.Thread(target=remove_a_workers_node_mid_run)
    remover.start()
    result = _experiment(digits, path, backend).run()
    remover.join()

    assert removed, "no node was removed"
    lost = [e for e in result.events if e["kind"] == "worker_lost"]
    assert len(lost) == 1
    assert removed[0] not in backend.nodes()  # the replacement runs on another node
    _assert_same_results(result, reference)
    assert not result.hops.duplicated(["model_id", "epoch", "kind", "shard"]).any()


# Bad input: clear errors before training starts --------------------------------------------------


def test_an_unreachable_address_is_named(digits, tmp_path):
    with pytest.raises(cerebro.ConfigError, match=r"address='127\.0\.0\.1:9'.*cannot connect"):
        _experiment(digits, tmp_path / "run", cerebro.RayBackend(address="127.0.0.1:9"))
    assert not (tmp_path / "run").exists()


def test_more_workers_than_the_cluster_can_place(cluster, digits, tmp_path):
    with pytest.raises(cerebro.ConfigError, match=r"workers=4.*at most 3.*3 node\(s\), 3 CPUs"):
        _experiment(digits, tmp_path / "run", _cluster_backend(cluster, workers=4))


def test_a_shard_no_node_can_read_is_named_before_training(cluster, digits_arrays, tmp_path):
    dataset = cerebro.prepare_data(
        digits_arrays, tmp_path / "data", label="y", num_shards=4, validation=0.2
    )
    os.remove(dataset.shard_path("train", 3))
    experiment = _experiment(dataset, tmp_path / "run", _cluster_backend(cluster, workers=2))
    with pytest.raises(cerebro.ConfigError, match=r"shard 3.*readable per node") as error:
        experiment.run()
    hosts = {str(n["NodeManagerHostname"]) for n in ray.nodes()} if ray.is_initialized() else set()
    assert all(host in str(error.value) for host in hosts)
    with pytest.raises(cerebro.ConfigError, match="holding cerebro.db"):
        cerebro.load(tmp_path / "run")  # nothing was recorded


def test_cerebro_imports_without_ray_and_names_the_extra():
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import cerebro\n"
        "try:\n"
        "    cerebro.RayBackend()\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "cerebro[ray]"' in out.stdout


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("workers", 0),
        ("cpus_per_worker", -1),
        ("gpus_per_worker", "one"),
        ("address", ""),
        ("model_cache_mb", -1),
        ("model_cache_mb", 1.5),
    ],
)
def test_bad_options_are_named(option, value):
    with pytest.raises(cerebro.ConfigError, match=option):
        cerebro.RayBackend(**{option: value})


# Placement by data locality (the node survey is what each node's probe reported) -----------------


def _survey(**nodes):
    return {
        node: ray_backend._NodeSurvey(f"host-{node}", frozenset(shards), None)
        for node, shards in nodes.items()
    }


def test_shards_on_node_local_disks_go_to_workers_on_those_nodes():
    survey = _survey(a={0, 1}, b={2, 3})
    nodes_for = ray_backend._choose_nodes(2, {"a": 1, "b": 1}, survey)
    placement = {0: frozenset({0, 2}), 1: frozenset({1, 3})}  # round-robin ignores locality
    placed = ray_backend._place_by_locality(placement, nodes_for, survey, 4)
    for worker, node in enumerate(nodes_for):
        assert placed[worker] <= survey[node].shards
    assert set().union(*placed.values()) == {0, 1, 2, 3}


def test_shared_storage_keeps_the_round_robin_placement():
    survey = _survey(a={0, 1, 2, 3}, b={0, 1, 2, 3})
    placement = {0: frozenset({0, 2}), 1: frozenset({1, 3})}
    nodes_for = ray_backend._choose_nodes(2, {"a": 4, "b": 4}, survey)
    assert sorted(nodes_for) == ["a", "b"]  # spread, although one node could hold both
    assert ray_backend._place_by_locality(placement, nodes_for, survey, 4) == placement


def test_a_node_that_cannot_read_the_dataset_is_named():
    survey = _survey(a={0, 1, 2, 3})
    survey["b"] = ray_backend._NodeSurvey("host-b", frozenset(), "cannot read the dataset at /d")
    with pytest.raises(cerebro.ConfigError, match=r"node host-b.*cannot read the dataset at /d"):
        ray_backend._choose_nodes(2, {"a": 1, "b": 1}, survey)


def test_states_round_trip_through_the_object_store_format_exactly():
    import torch

    spec = builders.mlp({"lr": 0.01})
    spec.model(torch.zeros(2, 8, 8)).sum().backward()
    spec.optimizer.step()
    state = {
        "model": spec.model.state_dict(),
        "optimizer": spec.optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "counters": {"version": 3, "hops": [{"shard": 1}]},
        "half": torch.ones(3, dtype=torch.bfloat16),  # no numpy dtype: stays a tensor
    }
    back = ray_backend.from_object_store(ray_backend.to_object_store(state))
    assert state_equal(back, state)
    back["model"]["1.weight"].add_(1)  # writable, and not shared with the original
    assert not state_equal(back["model"], state["model"])


def test_states_come_out_of_the_object_store_as_views_where_asked():
    import numpy as np
    import torch

    stored = ray_backend.to_object_store({"w": torch.arange(4.0), "step": 2})
    view = ray_backend.from_object_store(stored, copy=False)
    assert view["step"] == 2
    assert np.shares_memory(view["w"].numpy(), stored["w"].array)  # no copy on the hop's path
    copied = ray_backend.from_object_store(stored)
    assert not np.shares_memory(copied["w"].numpy(), stored["w"].array)
