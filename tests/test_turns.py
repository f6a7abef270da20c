"""State files written in turns over two inodes (cerebro.turns): the bytes written over are
never ones a reader, a checkpoint or an older state still needs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading

import torch

from cerebro import files, statefile, training, turns
from cerebro.backends.base import StateSaved
from cerebro.backends.handover import DurableWriter
from cerebro.state import Counters


def _write(path: str, payload: bytes) -> bool:
    return turns.write_in_turns(path, len(payload), lambda f: f.write(payload))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_version_is_written_over_the_one_before_the_last(tmp_path):
    path = str(tmp_path / "state.pt")
    assert not _write(path, b"v1")  # no spare yet: new files
    first = os.stat(path).st_ino
    assert not _write(path, b"v2")
    assert _write(path, b"v3")  # over v1's bytes, then renamed over the file
    assert os.stat(path).st_ino == first
    assert _read(path) == b"v3" and _read(turns.spare_of(path)) == b"v2"
    assert _write(path, b"v4") and _read(path) == b"v4"


def test_a_reader_keeps_its_version_whole_while_newer_ones_are_written(tmp_path):
    path = str(tmp_path / "state.pt")
    _write(path, b"v1")
    with turns.open_current(path) as reading:  # holds v1's inode for the whole read
        assert not _write(path, b"v2")
        assert not _write(path, b"v3")  # v1's bytes are being read: a new file instead
        assert _write(path, b"v4")  # over v2's, which no one reads
        assert reading.read() == b"v1"
    assert _read(path) == b"v4"


def test_an_epoch_checkpoint_linked_to_the_file_is_never_written_over(tmp_path):
    path = str(tmp_path / "state.pt")
    checkpoint = str(tmp_path / "epoch-0.pt")
    _write(path, b"e0")
    os.link(path, checkpoint)  # as CheckpointKeeper.take makes it
    for version in (b"v1", b"v2", b"v3", b"v4"):
        _write(path, version)
    assert _read(checkpoint) == b"e0" and _read(path) == b"v4"


def test_a_version_of_another_size_goes_to_a_new_file(tmp_path):
    path = str(tmp_path / "state.pt")
    _write(path, b"v1")
    _write(path, b"v2")
    assert not _write(path, b"longer v3")
    assert _read(path) == b"longer v3"


def test_states_read_earlier_keep_their_values_when_their_bytes_are_written_over(tmp_path):
    """Readers copy what they keep: a state read, then two versions written in turns over its
    file's bytes, is the state read (a mapping of the file would show the newest)."""
    path = str(tmp_path / "state.pt")
    source = str(tmp_path / "source.pt")

    def version(value: float) -> None:
        statefile.write({"w": torch.full((1000,), value), "counters": {"version": 0}}, source)
        with open(source, "rb") as f:
            payload = f.read()
        _write(path, payload)

    version(1.0)
    early = training.load_state(path)
    first = os.stat(path).st_ino
    version(2.0)
    version(3.0)
    assert os.stat(path).st_ino == first  # version 3 was written over version 1's bytes
    assert torch.equal(early["w"], torch.full((1000,), 1.0))
    assert torch.equal(training.load_state(path)["w"], torch.full((1000,), 3.0))
    assert training.load_counters(path) == {"version": 0}


def test_a_reader_opens_the_newer_version_renamed_in_while_it_opened(tmp_path, monkeypatch):
    path = str(tmp_path / "state.pt")
    _write(path, b"v1")
    _write(path, b"v2")
    real = fcntl.flock
    raced = []

    def flock(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_SH and not raced:  # the reader opened v2's inode just now
            raced.append(True)
            assert _write(path, b"v3")  # a newer version renamed in before its lock
        real(fd, operation)

    monkeypatch.setattr(turns.fcntl, "flock", flock)
    with turns.open_current(path) as f:
        assert f.read() == b"v3"
    assert raced


def test_spares_are_partial_writes_that_recovery_clears(tmp_path):
    path = str(tmp_path / "state.pt")
    _write(path, b"v1")
    _write(path, b"v2")
    # A crash between the renames of a write leaves its writer's name for the file it kept:
    # this writer's own is taken over, another process's left for recovery.
    ours = f"{path}{files.PARTIAL_MARK}kept-{os.getpid()}-{threading.get_ident()}"
    theirs = f"{path}{files.PARTIAL_MARK}kept-1-1"
    os.link(path, ours)
    os.link(path, theirs)
    assert _write(path, b"v3") and _read(path) == b"v3"
    assert os.path.exists(turns.spare_of(path)) and not os.path.exists(ours)
    files.remove_partial_writes(str(tmp_path))
    assert os.listdir(tmp_path) == ["state.pt"]


def test_two_writers_of_one_file_at_once_never_leave_it_torn(tmp_path):
    """Two Ray workers may save versions of one model at once (the one that trained it before
    is still writing when the next one is done): each write is whole, none fails, and readers
    only ever see whole versions."""
    path = str(tmp_path / "state.pt")
    size = 1 << 16
    errors: list[BaseException] = []

    def writer(tag: int) -> None:
        try:
            for i in range(200):
                payload = bytes([tag * 16 + i % 16]) * size
                turns.write_in_turns(path, size, lambda f, p=payload: f.write(p))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in (1, 2)]
    for thread in threads:
        thread.start()
    seen = 0
    while any(t.is_alive() for t in threads):
        with contextlib.suppress(FileNotFoundError), turns.open_current(path) as f:
            data = f.read()
            assert len(data) == size and data == data[:1] * size  # one version, whole
            seen += 1
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert seen and _read(path) == _read(path)[:1] * size


def test_the_durable_writer_writes_in_turns_and_drops_the_spare_of_a_released_model(tmp_path):
    saved: list[StateSaved] = []
    writer = DurableWriter(saved.append)
    target = str(tmp_path / "state.pt")
    inodes = []
    try:
        for version in (1, 2, 3):
            slot = writer.target_for(5, str(tmp_path))
            with open(slot, "wb") as f:
                f.write(b"state %d" % version)
            writer.handed_over(5, version, slot, target)
            assert writer.drain(10)
            inodes.append(os.stat(target).st_ino)
        assert inodes[2] == inodes[0] and _read(target) == b"state 3"
        assert os.path.exists(turns.spare_of(target))
        writer.release(5)
        assert not os.path.exists(turns.spare_of(target)) and _read(target) == b"state 3"
    finally:
        writer.close()
    assert [s.version for s in saved] == [1, 2, 3] and all(s.ok for s in saved)


def test_save_state_writes_in_turns_and_makes_a_first_states_folder(tmp_path):
    """training.save_state (the first state of a model, a Ray worker's writes, a state no
    handover slot had room for) takes turns like the durable writer, in cerebro's format."""
    path = str(tmp_path / "model-00007" / "state.pt")  # no folder yet
    inodes, sizes = [], set()
    for version in range(3):
        hops = [{"shard": s, "epoch": 0} for s in range(version)]  # a longer header each time
        state = {"model": {"w": torch.full((1000,), float(version))}, "counters": {"hops": hops}}
        training.save_state(state, path)
        inodes.append(os.stat(path).st_ino)
        sizes.add(os.path.getsize(path))
    assert len(sizes) == 1  # the header has room for the hops to come
    assert inodes[2] == inodes[0] and inodes[1] != inodes[0]  # two inodes, in turns
    assert training.load_state(path)["model"]["w"][0].item() == 2.0
    assert os.path.exists(turns.spare_of(path))


def _state(version: int) -> dict:
    counters = Counters(version=version).to_dict()
    return {"model": {"w": torch.full((100,), float(version))}, "counters": counters}


def test_a_state_saved_newer_only_never_goes_over_a_newer_version(tmp_path):
    """Ray's workers save a model's versions in the background, each the one it trained: the
    save of version 3 may end after that of version 4, and must leave the file at 4."""
    path = str(tmp_path / "model-00001" / "state.pt")
    assert training.save_state(_state(4), path, newer_only=True)
    assert not training.save_state(_state(3), path, newer_only=True)  # came late: left out
    assert training.load_state(path)["model"]["w"][0].item() == 4.0
    assert training.save_state(_state(4), path, newer_only=True)  # the same version again
    assert training.save_state(_state(5), path, newer_only=True)
    assert training.load_state(path)["counters"]["version"] == 5
    # Elsewhere (a roll-back's first state, say) a write is a write.
    assert training.save_state(_state(2), path)
    assert training.load_state(path)["counters"]["version"] == 2


def test_the_durable_writer_leaves_a_newer_version_written_straight_to_the_file(tmp_path):
    """A state no slot had room for goes straight to its file: the copy of the version
    before it, still waiting for the writer, must not put the file back a version."""
    saved: list[StateSaved] = []
    writer = DurableWriter(saved.append)
    target = str(tmp_path / "state.pt")
    try:
        slot = writer.target_for(5, str(tmp_path))
        statefile.write(_state(4), slot)  # handed over in the slot
        training.save_state(_state(5), target)  # the next one, with no room in a slot
        writer.handed_over(5, 4, slot, target)
        assert writer.drain(10)
    finally:
        writer.close()
    assert training.file_version(target) == 5
    assert [(s.version, s.ok) for s in saved] == [(4, True)]  # durable: a newer one is
