"""Slot files: states trained in place in a few recycled shared-memory files per model, and the
driver's bookkeeping of which slot holds what (see cerebro.backends.slots and .handover)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import threading

import builders
import pytest
import torch
from conftest import assert_same_results, small_experiment, state_equal
from test_techniques import PARAMS, SCHEDULE, SEED, _initial, _member, worker_config

import cerebro
from cerebro import statefile, training
from cerebro.backends import worker as worker_module
from cerebro.backends.base import StateSaved, Unit, UnitDone, UnitMember
from cerebro.backends.handover import DurableWriter, HandoverFolder, write_states
from cerebro.backends.slots import reserve
from cerebro.backends.worker import WorkerRuntime
from cerebro.kinds import UnitKind
from cerebro.state import Counters

CPU = torch.device("cpu")


class _Driver:
    """What LocalBackend does around its workers' units, in this process: a target slot for
    each training member, the hand-over of its new state, a durable copy behind it."""

    def __init__(self, digits, tmp_path, monkeypatch, workers: int = 2) -> None:
        monkeypatch.setattr(worker_module, "_in_worker", False)
        self.folder = HandoverFolder(budget_mb=64)
        self.saved: list[StateSaved] = []
        self.writer = DurableWriter(self.saved.append)
        self.paths = {m: str(tmp_path / f"model-{m}.pt") for m in PARAMS}
        for model_id, path in self.paths.items():
            training.save_state(_initial(model_id), path)
        self.runtimes = [
            WorkerRuntime(
                worker_config(
                    digits,
                    w,
                    1024,
                    handover_dir=self.folder.path,
                    handover_budget=self.folder.budget,
                )  # fmt: skip
            )
            for w in range(workers)
        ]
        self.version = dict.fromkeys(PARAMS, 0)
        self.targets: dict[int, list[str]] = {m: [] for m in PARAMS}

    def member(
        self, model_id: int, epoch: int, shard: int, train: bool = True, in_place: bool = False
    ) -> UnitMember:
        """``in_place``: as LocalBackend asks, the slot the state is in may be the target."""
        version = self.version[model_id]
        member = _member(model_id, self.paths[model_id], version, epoch, shard)
        source = self.writer.file_of(model_id, version)
        target = (
            self.writer.target_for(model_id, self.folder.path, version if in_place else None)
            if train
            else None
        )
        return dataclasses.replace(member, source=source, target=target)

    def train(self, worker: int, unit: Unit) -> UnitDone:
        done, snapshots = self.runtimes[worker].run(unit)
        assert done.ok, done.error
        states = write_states(unit, snapshots, self.runtimes[worker].slots)
        assert not states.failed, states.failed
        written = states.written
        for member in unit.members:
            assert written[member.model_id].path == member.target  # handed over, in its slot
            self.version[member.model_id] += 1
            self.targets[member.model_id].append(member.target)
            self.writer.handed_over(
                member.model_id, self.version[member.model_id], member.target, member.state_path
            )
        assert self.writer.drain(30)  # its durable copy made: older slots are free again
        return done

    def close(self) -> None:
        self.writer.close()
        self.folder.close()


@pytest.fixture
def driver(digits, tmp_path, monkeypatch):
    made = _Driver(digits, tmp_path, monkeypatch)
    yield made
    made.close()


def test_models_hopping_through_recycled_slots_train_as_one_process(digits, driver):
    for unit_id, (model_id, epoch, shard, last) in enumerate(SCHEDULE):
        member = driver.member(model_id, epoch, shard)
        unit = Unit(unit_id, UnitKind.TRAIN, epoch, (shard,), unit_id % 2, (member,), last)
        driver.train(unit_id % 2, unit)  # the workers take turns: every unit is a hop
    shards = [digits.load_shard("train", s) for s in range(digits.num_shards)]
    for model_id in PARAMS:
        order = [[s for m, e, s, _ in SCHEDULE if m == model_id and e == ep] for ep in (0, 1)]
        reference = training.train_in_process(
            builders.mlp, PARAMS[model_id], shards, order, SEED, model_id
        )
        newest = driver.writer.file_of(model_id, driver.version[model_id])
        for path in (newest, driver.paths[model_id]):  # the slot and its durable copy
            saved = training.load_state(path)
            assert state_equal(saved["model"], reference.model.state_dict()), (model_id, path)
            assert state_equal(saved["optimizer"], reference.optimizer.state_dict())
        # Two slots take turns: the newest state's, and the one the next state goes to.
        assert len(set(driver.targets[model_id])) == 2, driver.targets[model_id]
    assert [s.version for s in driver.saved if s.model_id == 0] == list(range(1, 6))
    assert all(s.ok for s in driver.saved)


def test_a_model_brought_back_from_its_state_file_ignores_the_slot_it_was_trained_in(
    digits, driver, monkeypatch
):
    """A roll-back: the worker holds the model built at the version its state file has, but
    bound to a slot that meanwhile holds other bytes. It must read the file."""
    runtime = driver.runtimes[0]
    for unit_id, shard in enumerate((0, 1)):
        member = driver.member(0, 0, shard)
        driver.train(0, Unit(unit_id, UnitKind.TRAIN, 0, (shard,), 0, (member,)))
    slot = driver.targets[0][-1]
    with open(slot, "r+b") as f:  # recycled for another state: other bytes, same layout
        f.seek(os.path.getsize(slot) // 2)
        f.write(os.urandom(4096))
    member = dataclasses.replace(driver.member(0, 0, 2), source=None)  # from the state file
    assert runtime.needs_state(member)  # a model bound to a slot is always brought in again
    done, snapshots = runtime.run(Unit(2, UnitKind.TRAIN, 0, (2,), 0, (member,)))
    assert done.ok, done.error
    without_slots = WorkerRuntime(worker_config(digits, 9, 0))
    expected, reference = without_slots.run(
        Unit(2, UnitKind.TRAIN, 0, (2,), 0, (dataclasses.replace(member, target=None),))
    )
    assert expected.ok and expected.passes[0].results[0].sums == done.passes[0].results[0].sums
    assert state_equal(snapshots[0]["model"], reference[0]["model"])
    assert state_equal(snapshots[0]["optimizer"], reference[0]["optimizer"])


def _eval_member(driver: _Driver, model_id: int) -> UnitMember:
    return driver.member(model_id, 0, 1, train=False)


def test_evaluating_a_model_from_its_slot_changes_nothing_in_the_slot(digits, driver):
    member = driver.member(0, 0, 0)
    driver.train(0, Unit(0, UnitKind.TRAIN, 0, (0,), 0, (member,), end_of_epoch=True))
    slot = driver.writer.file_of(0, 1)
    before = _digest(slot)
    for worker in (0, 1):  # the worker that trained it (bound to the slot), and another
        done, snapshots = driver.runtimes[worker].run(
            Unit(1 + worker, UnitKind.EVAL, 0, (1,), worker, (_eval_member(driver, 0),))
        )
        assert done.ok and snapshots == {}, done.error
        reference = training.build_spec(builders.mlp, PARAMS[0], init_seed=None)
        training.restore_state(reference, training.load_state(driver.paths[0]), CPU)
        expected = training.run_eval_hop(reference, digits.load_shard("val", 1), CPU)
        assert done.passes[0].results[0].sums == expected.sums
    assert _digest(slot) == before


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_the_writer_recycles_slots_and_deletes_them_when_their_model_is_released(tmp_path):
    saved: list[StateSaved] = []
    writer = DurableWriter(saved.append)
    folder = str(tmp_path)
    try:
        first = writer.target_for(7, folder)
        second = writer.target_for(7, folder)
        assert first != second  # both leased: each a new name
        writer.unlease(7, second)  # its unit failed: free again
        assert writer.target_for(7, folder) == second
        for version, path in ((1, first), (2, second)):
            with open(path, "wb") as f:
                f.write(b"state %d" % version)
            writer.handed_over(7, version, path, str(tmp_path / f"durable-{version}.pt"))
            assert writer.drain(10)
        assert writer.file_of(7, 2) == second and writer.file_of(7, 1) is None
        assert writer.target_for(7, folder) == first  # version 1 is durable and not newest
        # A replayed version 2 (after a roll-back) supersedes the first one's file.
        writer.handed_over(7, 2, first, str(tmp_path / "durable-2.pt"))
        assert writer.file_of(7, 2) == first and not os.path.exists(second)
        assert writer.drain(10)
        writer.release(7)
        assert not os.path.exists(first) and writer.file_of(7, 2) is None
    finally:
        writer.close()
    assert [s.version for s in saved] == [1, 2, 2] and all(s.ok for s in saved)


def test_the_writer_gives_a_slot_to_train_in_once_its_durable_copy_is_written(tmp_path):
    writer = DurableWriter(lambda saved: None)
    folder = str(tmp_path)
    try:
        slot = writer.target_for(3, folder, version=0)  # version 0 is in no slot: a new one
        with open(slot, "wb") as f:
            f.write(b"state 1")
        writer.handed_over(3, 1, slot, str(tmp_path / "durable.pt"))
        with writer._lock:  # the copy of version 1 not written yet
            writer._models[3].copying.add(1)
            writer._models[3].durable = 0
            elsewhere = writer.target_for(3, folder, version=1)
        assert elsewhere != slot  # the slot is the only copy of version 1: left as it is
        writer.unlease(3, elsewhere)
        writer.handed_over(3, 1, slot, str(tmp_path / "durable.pt"))  # copied this time
        assert writer.drain(10)
        assert writer.target_for(3, folder, version=1) == slot  # durable: trained in place
        assert writer.file_of(3, 1) is None  # a unit run again reads the state file
        writer.unlease(3, slot)  # its unit failed: what the slot holds is no one's state
        assert writer.file_of(3, 1) is None and writer.target_for(3, folder) == slot
    finally:
        writer.close()


def test_the_writer_makes_a_spare_slot_ahead_of_the_models_next_unit(tmp_path):
    folder = HandoverFolder(budget_mb=1)
    writer = DurableWriter(lambda saved: None, folder)
    try:
        slot = writer.target_for(5, folder.path)
        with open(slot, "wb") as f:
            f.write(b"x" * 4096)
        writer.handed_over(5, 1, slot, str(tmp_path / "durable.pt"))
        assert writer.drain(10)
        spare = writer.target_for(5, folder.path)  # made by the writer, as large as the slot
        assert spare != slot and os.path.getsize(spare) == 4096
        writer.unlease(5, spare)
        big = writer.target_for(6, folder.path)
        with open(big, "wb") as f:
            f.write(b"x" * 700_000)
        writer.handed_over(6, 1, big, str(tmp_path / "durable-6.pt"))
        assert writer.drain(10)
        assert not os.path.exists(writer.target_for(6, folder.path))  # no room: none made
        writer.release(5)
        assert not os.path.exists(spare) and not os.path.exists(slot)
    finally:
        writer.close()
        folder.close()


def test_a_state_written_to_its_file_trains_on_into_a_spare_slot_of_another_size(digits, driver):
    """After a PBT exploit the model's state is in its state file, of another size than its
    slots, and the unit's target may be a spare the writer made ahead (zeros, no state yet):
    the new state goes to a new file in the spare's place, and the unit does not fail."""
    driver.train(0, Unit(0, UnitKind.TRAIN, 0, (0,), 0, (driver.member(0, 0, 0),)))
    slot = driver.targets[0][-1]
    trained = training.load_state(slot)
    counters = {**trained["counters"], "version": 2}
    exploited = training.warm_start_state(builders.mlp, PARAMS[0], trained, counters)
    training.save_state(exploited, driver.paths[0])  # as the driver's exploit writes it
    assert os.path.getsize(driver.paths[0]) != os.path.getsize(slot)
    driver.version[0] = 2
    member = dataclasses.replace(driver.member(0, 0, 1), source=None)
    assert reserve(driver.folder.path, driver.folder.budget, member.target, os.path.getsize(slot))
    reference, _ = WorkerRuntime(worker_config(digits, 9, 0)).run(  # no slots, before the copy
        Unit(1, UnitKind.TRAIN, 0, (1,), 1, (dataclasses.replace(member, target=None),))
    )
    done = driver.train(1, Unit(1, UnitKind.TRAIN, 0, (1,), 1, (member,)))
    assert reference.ok and done.passes[0].results[0].sums == reference.passes[0].results[0].sums
    assert training.load_counters(member.target)["version"] == 3


def test_an_epochs_last_state_is_copied_before_the_states_waiting(tmp_path, monkeypatch):
    order: list[int] = []
    started, go_on = threading.Event(), threading.Event()

    def write(copy):
        order.append(copy.model_id)
        started.set()
        go_on.wait(10)
        return StateSaved(copy.model_id, copy.version, ok=True, path=copy.target)

    monkeypatch.setattr(DurableWriter, "_write", staticmethod(write))
    writer = DurableWriter(lambda saved: None)
    try:
        writer.handed_over(1, 1, str(tmp_path / "a"), str(tmp_path / "1.pt"))
        assert started.wait(10)  # model 1's copy is being made
        writer.handed_over(2, 1, str(tmp_path / "b"), str(tmp_path / "2.pt"))
        writer.handed_over(3, 1, str(tmp_path / "c"), str(tmp_path / "3.pt"), first=True)
        go_on.set()
        assert writer.drain(10)
    finally:
        writer.close()
    assert order == [1, 3, 2]  # model 3 waits for its copy: it goes before model 2's


def test_models_trained_in_the_slots_they_are_in_train_as_one_process(digits, driver, monkeypatch):
    """Each unit trains in the slot its state is in where its durable copy is written: a
    model staying on its worker then starts with no copy and no read at all."""
    brought_in: list[str] = []
    bring_in = worker_module.SlotMaps.bring_in
    monkeypatch.setattr(
        worker_module.SlotMaps,
        "bring_in",
        lambda self, source, target: brought_in.append(source) or bring_in(self, source, target),
    )
    in_place = no_copy = 0
    last: dict[int, tuple[int, bool]] = {}  # model -> its last unit's worker, and if from a slot
    for unit_id, (model_id, epoch, shard, end) in enumerate(SCHEDULE):
        worker = (unit_id // 4) % 2  # runs of four units on one worker, then a hop
        member = driver.member(model_id, epoch, shard, in_place=True)
        brought_in.clear()
        unit = Unit(unit_id, UnitKind.TRAIN, epoch, (shard,), worker, (member,), end)
        driver.train(worker, unit)
        if member.source is not None and member.target == member.source:
            in_place += 1
            # Bound to its slot here last time (not read from its state file): used as it is.
            stayed = last[model_id] == (worker, True)
            assert (brought_in == []) == stayed, (unit_id, brought_in)
            no_copy += stayed
        last[model_id] = (worker, member.source is not None)
    assert in_place == len(SCHEDULE) - 2 and no_copy >= 2  # all but each model's first unit
    shards = [digits.load_shard("train", s) for s in range(digits.num_shards)]
    for model_id in PARAMS:
        order = [[s for m, e, s, _ in SCHEDULE if m == model_id and e == ep] for ep in (0, 1)]
        reference = training.train_in_process(
            builders.mlp, PARAMS[model_id], shards, order, SEED, model_id
        )
        for path in (driver.targets[model_id][-1], driver.paths[model_id]):
            saved = training.load_state(path)
            assert state_equal(saved["model"], reference.model.state_dict()), (model_id, path)
            assert state_equal(saved["optimizer"], reference.optimizer.state_dict())
        assert len(set(driver.targets[model_id])) == 1  # one slot, trained in again and again


def test_states_through_slots_give_the_results_of_states_through_their_files(digits, tmp_path):
    def run(name: str, handover_mb: int | None) -> cerebro.Result:
        return small_experiment(
            digits,
            tmp_path / name,
            epochs=2,
            deterministic=True,
            backend=cerebro.LocalBackend(workers=2, handover_mb=handover_mb),
        ).run()

    assert_same_results(run("slots", None), run("files", 0))


def test_counters_in_a_slot_follow_each_hop(driver):
    member = driver.member(1, 0, 3)
    driver.train(1, Unit(0, UnitKind.TRAIN, 0, (3,), 1, (member,)))
    counters = Counters.from_dict(training.load_state(member.target)["counters"])
    assert counters.version == 1 and counters.visited == [3]


def test_an_evaluation_uses_the_model_in_place_while_its_slot_holds_what_was_handed_over(
    digits, driver, monkeypatch
):
    reads: list[str] = []
    load, mapped = training.load_state, statefile.read_mapped
    monkeypatch.setattr(training, "load_state", lambda path: reads.append(path) or load(path))
    # A slot is read mapped copy-on-write (SlotMaps.read).
    monkeypatch.setattr(statefile, "read_mapped", lambda path: reads.append(path) or mapped(path))
    for unit_id, shard in enumerate((0, 2)):  # the second hand-over rewrites its slot in place
        member = driver.member(0, 0, shard)
        driver.train(0, Unit(unit_id, UnitKind.TRAIN, 0, (shard,), 0, (member,), shard == 2))
    reference = training.build_spec(builders.mlp, PARAMS[0], init_seed=None)
    training.restore_state(reference, load(driver.paths[0]), CPU)
    expected = training.run_eval_hop(reference, digits.load_shard("val", 1), CPU)
    runtime, slot = driver.runtimes[0], driver.writer.file_of(0, 2)
    reads.clear()
    done, _ = runtime.run(Unit(2, UnitKind.EVAL, 0, (1,), 0, (_eval_member(driver, 0),)))
    assert done.ok and done.passes[0].results[0].sums == expected.sums
    assert reads == []  # the worker that handed it over evaluates the model it holds
    with open(slot, "r+b") as f:  # another worker wrote there since (a byte of its header)
        f.seek(len(statefile.MAGIC) + 8 + 4000)
        f.write(b"\1")
    done, _ = runtime.run(Unit(3, UnitKind.EVAL, 0, (1,), 0, (_eval_member(driver, 0),)))
    assert done.ok and reads == [slot]  # brought in again


def test_a_new_run_removes_the_handover_folders_of_drivers_that_died(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    dead = tmp_path / f"cerebro-handover-{int(finished.stdout)}-abc"
    alive = tmp_path / f"cerebro-handover-{os.getpid()}-def"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "model-00000-s0.pt").write_bytes(b"state")
    made = HandoverFolder(budget_mb=1, root=str(tmp_path))
    assert not dead.exists() and alive.exists() and os.path.isdir(made.path)
    made.close()
