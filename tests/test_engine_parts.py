"""The driver's parts, each on its own and without worker processes: the lifecycle's status
transitions, recovery's decisions from records and state files, the checkpoint keeper's
pruning, and control requests applied at hop boundaries. Records are a real SQLite store."""

from __future__ import annotations

import os
import warnings

import builders
import pytest

import cerebro
from cerebro import training
from cerebro.engine.building import ModelBuilder
from cerebro.engine.lifecycle import Lifecycle, Proposal
from cerebro.engine.recovery import Recovery, resume_point
from cerebro.engine.requests import RequestApplier
from cerebro.engine.roster import Roster
from cerebro.kinds import EventKind, ModelStatus, Origin, UnitKind
from cerebro.search.base import SearchContext
from cerebro.state import Counters, HopRecord
from cerebro.store import RecordStore, checkpoints
from cerebro.store import records as records_module
from cerebro.store.checkpoint_keeper import CheckpointKeeper, KeptModel
from cerebro.store.records import open_engine, sqlite_url
from cerebro.trackers import Tracker

SPACE = {"lr": cerebro.choice([0.01, 0.02, 0.03])}


class Recorder(Tracker):
    """Keeps what it is told."""

    def __init__(self) -> None:
        self.ended: list[tuple[int, ModelStatus]] = []
        self.epochs: list[tuple[int, int]] = []
        self.planned: list[int] = []

    def model_ended(self, model_id, status, params, history):
        self.ended.append((model_id, status))

    def epoch_ended(self, model_id, epoch, metrics):
        self.epochs.append((model_id, epoch))

    def plan(self, units_total):
        self.planned.append(units_total)


class Parts:
    """A roster, lifecycle, keeper and request applier over real records (no workers)."""

    def __init__(self, digits, tmp_path, search, epochs=3, early_stopping=None, store=None):
        context = SearchContext("val_accuracy", "max", epochs, digits.num_shards, 1)
        search.attach(context)
        if early_stopping is not None:
            early_stopping.attach(context)
        self.checkpoint_dir = str(tmp_path / "checkpoints")
        self.store = store or RecordStore.create(sqlite_url(str(tmp_path)), "parts", {})
        val = frozenset(s for s, n in enumerate(digits.shard_rows("val")) if n > 0)
        self.roster = Roster(
            self.checkpoint_dir, digits.num_shards, val, epochs, search.max_epochs, 0, False
        )
        self.builder = ModelBuilder(builders.mlp, digits, "val_accuracy", seed=0)
        self.tracker = Recorder()
        self.lifecycle = Lifecycle(
            self.roster,
            self.builder,
            search,
            None,
            early_stopping,
            self.tracker,
            "val_accuracy",
            "max",
        )
        self.keeper = CheckpointKeeper(self.store, "last_and_best", None, self.lifecycle.kept)
        self.lifecycle.attach(self.store, self.keeper)
        self.requests = RequestApplier(self.roster, self.lifecycle, self.builder, seed=0)

    def add_proposals(self):
        self.lifecycle.add(self.lifecycle.propose(strict=True))

    def train_epoch(self, model, accuracy):
        """What the driver does when every unit of an epoch came back: sums, then the end."""
        for shard in sorted(self.roster.train_shards):
            model.train.add(shard, 10, {"loss": 5.0, "accuracy": 5.0})
        for shard in sorted(self.roster.val_shards):
            model.val.add(shard, 10, {"loss": 5.0, "accuracy": 10 * accuracy})
        model.remaining = []
        self.lifecycle.finish_epoch(model)

    def status_in_records(self, model_id):
        return next(m for m in self.store.models() if m["model_id"] == model_id)["status"]

    def events(self, kind):
        return [e for e in self.store.snapshot().events if e["kind"] == kind]


# Lifecycle -------------------------------------------------------------------------------------


def test_a_model_that_trains_its_budget_completes_in_memory_records_and_trackers(digits, tmp_path):
    parts = Parts(digits, tmp_path, cerebro.GridSearch(SPACE), epochs=2)
    parts.add_proposals()
    model = parts.roster[0]
    assert model.status is ModelStatus.RUNNING and model.remaining == [0, 1, 2, 3]
    parts.train_epoch(model, 0.5)
    assert model.epoch == 1 and model.phase is UnitKind.TRAIN and len(model.remaining) == 4
    assert parts.status_in_records(0) == "running"
    parts.train_epoch(model, 0.6)
    assert model.status is ModelStatus.COMPLETED and model.remaining == []
    assert parts.status_in_records(0) == "completed"
    assert (0, ModelStatus.COMPLETED) in parts.tracker.ended
    assert parts.tracker.epochs.count((0, 0)) == 1 and (0, 1) in parts.tracker.epochs
    assert [e["epoch"] for e in parts.store.epochs() if e["model_id"] == 0] == [0, 1]


def test_a_paused_model_is_reviewed_then_pruned_when_nothing_can_decide_it(digits, tmp_path):
    asha = cerebro.ASHA(SPACE, num_models=3, max_epochs=3, parallelism=3)
    parts = Parts(digits, tmp_path, asha, epochs=3)
    parts.add_proposals()
    models = [parts.roster[i] for i in range(3)]
    parts.train_epoch(models[0], 0.9)  # rung 1 with n=1: quota 0, it waits
    assert models[0].status is ModelStatus.PAUSED
    assert parts.status_in_records(0) == "paused"
    parts.train_epoch(models[1], 0.5)
    parts.train_epoch(models[2], 0.4)  # n=3, quota 1: model 0 (best) may go on
    parts.lifecycle.review_paused()
    assert models[0].status is ModelStatus.RUNNING
    assert [e["detail"]["model"] for e in parts.events(EventKind.CONTINUED)] == [0]
    assert models[1].status is ModelStatus.PAUSED and models[2].status is ModelStatus.PAUSED
    assert parts.lifecycle.prune_waiting()
    assert parts.status_in_records(1) == "pruned" and parts.status_in_records(2) == "pruned"
    assert {e["detail"]["model"] for e in parts.events(EventKind.PRUNED)} == {1, 2}
    # A pruned model stays at the start of its next epoch, so a person can resume it.
    assert models[1].epoch == 1 and models[1].remaining == [0, 1, 2, 3]


def test_an_early_stopping_rule_is_asked_first_and_named_in_the_pruning(digits, tmp_path):
    rule = cerebro.MedianStopping(grace_epochs=0, min_trials=1)
    parts = Parts(digits, tmp_path, cerebro.GridSearch(SPACE), early_stopping=rule)
    parts.add_proposals()
    parts.train_epoch(parts.roster[0], 0.9)
    parts.train_epoch(parts.roster[1], 0.1)
    assert parts.roster[1].status is ModelStatus.PRUNED
    (event,) = parts.events(EventKind.PRUNED)
    assert event["detail"]["reason"].startswith("MedianStopping:")


def test_failing_a_model_records_its_error_and_frees_it(digits, tmp_path):
    parts = Parts(digits, tmp_path, cerebro.GridSearch(SPACE))
    parts.add_proposals()
    model = parts.roster[2]
    model.busy = True
    before = parts.roster.units_total()
    parts.lifecycle.fail(model, "the unit failed: boom")
    assert model.status is ModelStatus.FAILED and not model.busy and model.remaining == []
    row = next(m for m in parts.store.models() if m["model_id"] == 2)
    assert row["status"] == "failed" and row["error"] == "the unit failed: boom"
    assert parts.tracker.planned[-1] < before  # its remaining units left the total


def test_a_configuration_that_cannot_be_built_is_registered_failed(digits, tmp_path):
    parts = Parts(digits, tmp_path, cerebro.GridSearch(SPACE))
    model = parts.lifecycle.new_model({"lr": 0.01, "width": -1}, Origin.ADD, None, None)
    initial = parts.builder.initial_state(model.model_id, model.params, strict=False)
    parts.lifecycle.add([Proposal(model, initial)])
    assert initial.state is None and model.status is ModelStatus.FAILED
    row = parts.store.models()[0]
    assert row["status"] == "failed" and "Traceback" in row["error"]  # build's own traceback


# Recovery --------------------------------------------------------------------------------------


def _hop(shard: int) -> HopRecord:
    return HopRecord(
        shard=shard, rows=10, sums={"loss": 4.0, "accuracy": 5.0}, worker=0, start=1.0, end=2.0
    )


def test_resume_point_follows_the_state_not_the_records():
    two = (_hop(0), _hop(1))
    assert resume_point(Counters(version=0, epoch=3, hops=two), 5, 2, 9).epoch == 0
    partway = resume_point(Counters(version=5, epoch=2, hops=(_hop(1),)), 2, 4, 9)
    assert (partway.epoch, partway.visited, partway.trained) == (2, [1], False)
    validating = resume_point(Counters(version=6, epoch=2, hops=two), 2, 2, 9)
    assert (validating.epoch, validating.trained) == (2, True)
    next_epoch = resume_point(Counters(version=6, epoch=2, hops=two), 3, 2, 9)
    assert (next_epoch.epoch, next_epoch.hops, next_epoch.completed) == (3, (), False)
    assert resume_point(Counters(version=6, epoch=2, hops=two), 3, 2, 3).completed


def test_restore_drops_hop_records_the_state_never_saw_and_adds_those_it_did(digits, tmp_path):
    parts = Parts(digits, tmp_path, cerebro.GridSearch(SPACE))
    parts.add_proposals()
    model = parts.roster[0]
    initial = training.load_state(model.state_path)
    counters = Counters.from_dict(initial["counters"])
    state = dict(initial)
    # The state saw shards 2 and 0 of epoch 0; the records hold 0 (kept) and 3 (never saved).
    state["counters"] = Counters(
        version=2, epoch=0, init_seed=counters.init_seed, hops=(_hop(2), _hop(0))
    ).to_dict()
    training.save_state(state, model.state_path)
    parts.lifecycle.record_hop(0, 0, UnitKind.TRAIN, _hop(0))
    parts.lifecycle.record_hop(0, 0, UnitKind.TRAIN, _hop(3))

    restored = Parts(digits, tmp_path, cerebro.GridSearch(SPACE), store=parts.store)
    Recovery(
        restored.roster, restored.lifecycle, restored.builder, restored.keeper, parts.store
    ).restore()
    again = restored.roster[0]
    assert (again.version, again.epoch, again.phase) == (2, 0, UnitKind.TRAIN)
    assert again.remaining == [1, 3]
    assert sorted(again.train.by_shard) == [0, 2]
    shards = sorted(parts.store.snapshot().hops.query("model_id == 0").shard)
    assert shards == [0, 2]


def test_a_lost_state_goes_back_to_its_newest_good_checkpoint(digits, tmp_path):
    parts = Parts(digits, tmp_path, cerebro.GridSearch(SPACE))
    parts.add_proposals()
    model = parts.roster[1]
    parts.train_epoch(model, 0.5)  # epoch 0 recorded, its checkpoint taken
    parts.keeper.close()
    assert [c["epoch"] for c in parts.store.snapshot().checkpoints if c["model_id"] == 1] == [0]
    os.remove(model.state_path)

    restored = Parts(digits, tmp_path, cerebro.GridSearch(SPACE), store=parts.store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Recovery(
            restored.roster, restored.lifecycle, restored.builder, restored.keeper, parts.store
        ).restore()
    assert any("epoch 0 checkpoint" in str(w.message) for w in caught)
    again = restored.roster[1]
    assert again.status is ModelStatus.RUNNING and again.history[0]["epoch"] == 0
    (event,) = [e for e in parts.store.snapshot().events if e["kind"] == "state_recovered"]
    assert event["detail"]["from_epoch"] == 0


def test_a_recorded_epoch_is_done_after_the_dataset_grew(digits_arrays, tmp_path):
    first = cerebro.prepare_data({k: v[:1200] for k, v in digits_arrays.items()}, tmp_path / "d")
    parts = Parts(first, tmp_path, cerebro.GridSearch(SPACE))
    parts.add_proposals()
    model = parts.roster[0]
    state = training.load_state(model.state_path)
    seed = Counters.from_dict(state["counters"]).init_seed
    hops = tuple(_hop(s) for s in range(first.num_shards))
    state["counters"] = Counters(version=4, epoch=0, init_seed=seed, hops=hops).to_dict()
    training.save_state(state, model.state_path)
    parts.train_epoch(model, 0.5)  # epoch 0 recorded over the 4 shards there were
    parts.keeper.close()
    grown = first.append({k: v[1200:] for k, v in digits_arrays.items()})

    restored = Parts(grown, tmp_path, cerebro.GridSearch(SPACE), store=parts.store)
    Recovery(
        restored.roster, restored.lifecycle, restored.builder, restored.keeper, parts.store
    ).restore()
    again = restored.roster[0]
    # Epoch 0 is not trained again on the new shards: epoch 1 visits all six.
    assert (again.epoch, again.phase, again.remaining) == (1, UnitKind.TRAIN, list(range(6)))


# Checkpoint keeper -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "best", "kept"),
    [("last_and_best", 1, [1, 3]), ("last", 1, [3]), ("all", 1, [0, 1, 2, 3]), (2, 0, [0, 2, 3])],
)
def test_the_keeper_records_every_checkpoint_and_prunes_by_its_policy(tmp_path, policy, best, kept):
    store = RecordStore.create(sqlite_url(str(tmp_path)), "keeper", {})
    folder = str(tmp_path / "model-00000")
    os.makedirs(folder)
    state = os.path.join(folder, "state.pt")
    keeper = CheckpointKeeper(store, policy, None, lambda _: KeptModel(folder, 4, best))
    for epoch in range(4):
        with open(state + ".tmp", "wb") as f:  # replaced, never changed in place, as workers do
            f.write(f"state after epoch {epoch}".encode())
        os.replace(state + ".tmp", state)
        keeper.take(0, folder, state, epoch)
    keeper.close()
    present = sorted(e for e in range(4) if os.path.exists(checkpoints.epoch_path(folder, e)))
    assert present == kept
    rows = sorted(store.snapshot().checkpoints, key=lambda c: c["epoch"])
    assert [c["epoch"] for c in rows] == [0, 1, 2, 3]
    assert [c["epoch"] for c in rows if c["pruned"]] == [e for e in range(4) if e not in kept]
    for row in rows:
        if not row["pruned"]:
            assert checkpoints.verified(row["path"], row["checksum"])


# Control requests ------------------------------------------------------------------------------


def _request(parts, op, model_id=None, params=None, **options):
    return parts.store.request_control(op, "test", model_id, params, options or None)


def test_a_stop_waits_for_the_models_unit_and_a_resume_before_it_cancels_it(digits, tmp_path):
    parts = Parts(digits, tmp_path, cerebro.GridSearch(SPACE))
    parts.add_proposals()
    model = parts.roster[0]
    model.busy = True
    first = _request(parts, "stop", 0)
    parts.requests.apply_pending(now=True)
    assert model.status is ModelStatus.RUNNING and parts.requests.has_waiting(model)
    _request(parts, "resume", 0)
    parts.requests.apply_pending(now=True)
    states = {r["id"]: r for r in parts.store.controls()}
    assert states[first]["state"] == "rejected" and "cancelled" in states[first]["error"]
    assert not parts.requests.has_waiting(model)

    _request(parts, "stop", 0)
    parts.requests.apply_pending(now=True)
    model.busy = False
    parts.requests.unit_over(model)
    assert model.status is ModelStatus.STOPPED and parts.status_in_records(0) == "stopped"


def test_requests_are_validated_when_applied_with_the_shared_checks(digits, tmp_path):
    parts = Parts(digits, tmp_path, cerebro.GridSearch(SPACE), epochs=2)
    parts.add_proposals()
    bad = [
        _request(parts, "resume", 0),  # it is running
        _request(parts, "set_epochs", 1, epochs=0),
        _request(parts, "add", None, {"lr": 0.01}, epochs=0),
        _request(parts, "stop", 7),
    ]
    parts.requests.apply_pending(now=True)
    rows = {r["id"]: r for r in parts.store.controls()}
    errors = [rows[i]["error"] for i in bad]
    assert all(rows[i]["state"] == "rejected" for i in bad)
    assert "a stopped or pruned model" in errors[0]
    assert "epochs=0" in errors[1] and "epochs=0" in errors[2]
    assert "model_id=7" in errors[3] and "ids 0-2" in errors[3]


def test_set_epochs_reopens_a_completed_model_and_ends_one_that_has_done_enough(digits, tmp_path):
    parts = Parts(digits, tmp_path, cerebro.GridSearch(SPACE), epochs=1)
    parts.add_proposals()
    done, other = parts.roster[0], parts.roster[1]
    parts.train_epoch(done, 0.5)
    assert done.status is ModelStatus.COMPLETED
    _request(parts, "set_epochs", 0, epochs=3)
    parts.requests.apply_pending(now=True)
    assert done.status is ModelStatus.RUNNING and done.epoch == 1 and len(done.remaining) == 4
    assert parts.roster.budget(done) == 3
    parts.train_epoch(other, 0.5)  # other completes its single epoch
    _request(parts, "add", None, {"lr": 0.02}, epochs=2)
    parts.requests.apply_pending(now=True)
    added = parts.roster[3]
    assert added.origin is Origin.ADD and parts.roster.budget(added) == 2


# Records ---------------------------------------------------------------------------------------


def _hop_count(url: str) -> int:
    engine = open_engine(url, create=False)
    try:
        with engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT COUNT(*) FROM hops").scalar_one())
    finally:
        engine.dispose()


def test_hop_records_wait_in_a_batch_until_another_write_or_their_time(tmp_path, monkeypatch):
    """A poll that only records hops costs no transaction: they are written with the next other
    record, or at a batch's end once they waited QUEUED_S, and always before a read."""
    url = sqlite_url(str(tmp_path))
    store = RecordStore.create(url, "queued", {})
    clock = [100.0]
    monkeypatch.setattr(records_module.time, "monotonic", lambda: clock[0])
    store._flushed = clock[0]

    def hop(shard: int) -> None:
        store.add_hop(model_id=0, epoch=0, kind="train", shard=shard, worker=0, start=0.0,
                      end=1.0, rows=8, load_s=0.0, save_s=None, metrics={})  # fmt: skip

    with store.batch():
        hop(0)
    assert _hop_count(url) == 0  # queued: not waited long enough
    clock[0] += records_module.QUEUED_S
    with store.batch():
        hop(1)
    assert _hop_count(url) == 2  # their time came: both written at the batch's end
    with store.batch():
        hop(2)
        store.add_event("note")  # another record: the queued hop goes first, in its transaction
    assert _hop_count(url) == 3
    with store.batch():
        hop(3)
        store.set_durable_version(0, 4)
    assert _hop_count(url) == 3 and len(store.snapshot().hops) == 4  # a read writes them first
    with store.batch():
        hop(4)
    store.close()  # and so does closing
    assert _hop_count(url) == 5
