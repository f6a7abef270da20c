"""Nothing lost, nothing unclear: an experiment path whose records are missing, empty, damaged,
read-only or someone else's, a driver killed without a word, and paths that cannot be written.

Each refusal is a ConfigError that names the path (or argument), comes before any worker starts,
and leaves every file as it was (compared by checksum).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import small_experiment, wait_for_train_hops

import cerebro
from cerebro.cli import main as cli_main
from cerebro.store import RecordStore, open_engine, sqlite_url

HERE = os.path.dirname(os.path.abspath(__file__))


def _experiment(digits, path, **overrides) -> cerebro.Experiment:
    return small_experiment(digits, path, **{"backend": _backend(), **overrides})


def _backend() -> cerebro.LocalBackend:
    """One worker whose starts are counted: a refusal must come before any."""
    backend = cerebro.LocalBackend(workers=1)
    backend.starts = 0
    start = backend.start

    def counted(*args, **kwargs):
        backend.starts += 1
        return start(*args, **kwargs)

    backend.start = counted
    return backend


def _files(root) -> dict[str, str]:
    """Every file under ``root`` with a checksum of its bytes."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            full = os.path.join(folder, name)
            with open(full, "rb") as f:
                found[os.path.relpath(full, root)] = hashlib.blake2b(f.read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def finished(digits, tmp_path_factory) -> Path:
    """A finished experiment (2 models, 1 epoch), copied by each test that changes it."""
    path = tmp_path_factory.mktemp("finished") / "run"
    _experiment(digits, path).run()._store.close()  # its WAL ends in cerebro.db
    assert not os.path.exists(path / "cerebro.db-wal")
    return path


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def _assert_refused(caught, path, *words) -> None:
    message = str(caught.value)
    assert caught.value.argument == "path" and repr(str(path)) in message, message
    for word in words:
        assert word in message, message


# Records lost beside checkpoints ----------------------------------------------------------------


def _remove_db(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def _empty_db(db: Path) -> None:
    _remove_db(db)
    db.write_bytes(b"")


def _garbage_db(db: Path) -> None:
    _remove_db(db)
    db.write_bytes(os.urandom(3000))


def _damaged_pages(db: Path) -> None:
    """A SQLite header and schema page, then garbage where the tables' pages were."""
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    head = db.read_bytes()[:4096]
    _remove_db(db)
    db.write_bytes(head + os.urandom(40960))


def _tables_without_experiment(db: Path) -> None:
    _remove_db(db)
    open_engine(f"sqlite:///{db}").dispose()  # cerebro's tables, no experiment in them


LOST_RECORDS = [
    (_remove_db, "missing"),
    (_empty_db, "empty (cerebro.db has 0 bytes"),
    (_garbage_db, "unreadable"),
    (_damaged_pages, "unreadable"),
    (_tables_without_experiment, "holds no experiment"),
]


@pytest.mark.parametrize(("damage", "said"), LOST_RECORDS)
def test_checkpoints_whose_records_are_lost_are_refused_and_kept(digits, run_copy, damage, said):
    damage(run_copy / "cerebro.db")
    before = _files(run_copy)
    assert any(name.startswith("checkpoints/model-") for name in before)
    backend = _backend()
    with pytest.raises(cerebro.ConfigError) as caught:
        _experiment(digits, run_copy, backend=backend)
    _assert_refused(
        caught, run_copy, "checkpoints of an earlier run exist", said, "backup", "overwrite=True"
    )
    assert _files(run_copy) == before
    assert backend.pids() == [] and backend.starts == 0


@pytest.mark.parametrize(("damage", "said"), LOST_RECORDS[:3])
def test_records_lost_after_the_experiment_was_made_are_refused_by_run(
    digits, run_copy, damage, said
):
    experiment = _experiment(digits, run_copy)  # the records were fine when it was made
    damage(run_copy / "cerebro.db")
    before = _files(run_copy)
    with pytest.raises(cerebro.ConfigError) as caught:
        experiment.run()
    _assert_refused(caught, run_copy, "checkpoints of an earlier run exist", said)
    assert _files(run_copy) == before
    assert experiment.backend.pids() == [] and experiment.backend.starts == 0


def test_overwrite_recovers_a_path_whose_records_are_garbage(digits, run_copy):
    _garbage_db(run_copy / "cerebro.db")
    (run_copy / "notes.txt").write_text("mine")
    result = _experiment(digits, run_copy, overwrite=True).run()
    assert [m.status for m in result.models] == ["completed", "completed"]
    assert (run_copy / "notes.txt").read_text() == "mine"


def test_a_sqlite_file_that_is_not_cerebros_is_refused_even_with_overwrite(digits, tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    with sqlite3.connect(path / "cerebro.db") as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    before = _files(path)
    for overwrite in (False, True):
        with pytest.raises(cerebro.ConfigError) as caught:
            _experiment(digits, path, overwrite=overwrite)
        _assert_refused(caught, path, "not a cerebro database", "invoices")
    assert _files(path) == before


# overwrite=True deletes only what cerebro wrote ---------------------------------------------


def test_overwrite_on_a_folder_of_someone_elses_files_is_refused(digits, tmp_path):
    path = tmp_path / "mine"
    (path / "data").mkdir(parents=True)
    (path / "notes.txt").write_text("keep me")
    (path / "data" / "table.csv").write_text("a,b\n1,2\n")
    before = _files(path)
    backend = _backend()
    with pytest.raises(cerebro.ConfigError) as caught:
        _experiment(digits, path, overwrite=True, backend=backend)
    _assert_refused(caught, path, "data, notes.txt", "no cerebro records", "nothing was deleted")
    assert _files(path) == before
    assert backend.pids() == [] and backend.starts == 0


def test_overwrite_keeps_a_persons_files_beside_the_experiment(digits, run_copy):
    (run_copy / "notes.txt").write_text("keep me")
    (run_copy / "checkpoints" / "README").write_text("mine too")
    old = _files(run_copy)
    result = _experiment(digits, run_copy, overwrite=True, epochs=2).run()
    assert set(result.history.epoch) == {0, 1}
    now = _files(run_copy)
    assert now["notes.txt"] == old["notes.txt"]
    assert now["checkpoints/README"] == old["checkpoints/README"]
    state = "checkpoints/model-00000/state.pt"
    assert now[state] != old[state]  # the old experiment's states were replaced


def test_overwrite_never_deletes_a_checkpoint_dir_that_holds_other_files(digits, tmp_path):
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "weights.pt").write_bytes(b"a person's model")
    _experiment(digits, tmp_path / "run", checkpoint_dir=mine).run()
    _experiment(digits, tmp_path / "run", checkpoint_dir=mine, overwrite=True, epochs=2).run()
    assert (mine / "weights.pt").read_bytes() == b"a person's model"
    assert (mine / "model-00000" / "state.pt").exists()


# Readers: damaged, empty and read-only records --------------------------------------------------


def _read_with_load(path) -> None:
    cerebro.load(path)


def _read_with_control(path) -> None:
    cerebro.control(path).models()


READERS = [_read_with_load, _read_with_control]


@pytest.mark.parametrize("read", READERS)
@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (_garbage_db, "not a cerebro database or is damaged: file is not a database"),
        (_damaged_pages, "not a cerebro database"),
        (_empty_db, "holds no experiment"),
        (_tables_without_experiment, "holds no experiment"),
    ],
)
def test_readers_name_the_path_of_damaged_or_empty_records_and_write_nothing(
    run_copy, read, damage, said
):
    damage(run_copy / "cerebro.db")
    before = _files(run_copy)
    with pytest.raises(cerebro.ConfigError) as caught:
        read(run_copy)
    message = str(caught.value)
    assert caught.value.argument == "path_or_url" and str(run_copy) in message, message
    assert said in message, message
    assert _files(run_copy) == before  # no table was made in an empty file


def test_cerebro_models_on_an_empty_db_exits_2_and_leaves_it_empty(run_copy, capsys):
    _empty_db(run_copy / "cerebro.db")
    assert cli_main(["models", str(run_copy)]) == 2
    assert "holds no experiment" in _printed(capsys)
    assert (run_copy / "cerebro.db").stat().st_size == 0
    _garbage_db(run_copy / "cerebro.db")
    assert cli_main(["models", str(run_copy)]) == 2
    assert "not a cerebro database" in _printed(capsys)


def _printed(capsys) -> str:
    """What the command printed, with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().out.split())


def test_readers_leave_the_records_as_they_were(run_copy):
    db = run_copy / "cerebro.db"
    before, mtime = _files(run_copy), db.stat().st_mtime_ns
    result = cerebro.load(run_copy)
    assert result.experiment["status"] == "completed"
    ctl = cerebro.control(run_copy)
    ctl.models()
    result._store.close()
    ctl._store.close()
    assert _files(run_copy) == before and db.stat().st_mtime_ns == mtime


READ_ONLY = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    import builders, cerebro
    from cerebro.cli import main
    path, data = sys.argv[1], sys.argv[2]
    assert not os.access(path, os.W_OK), "the test needs a folder this process cannot write"
    result = cerebro.load(path)
    print("status", result.experiment["status"], "models", len(result.models))
    print("state", sum(p.numel() for p in result.load_model().parameters()) > 0)
    assert main(["models", path]) == 0
    try:
        cerebro.Experiment(builders.mlp, data, cerebro.GridSearch({{"lr": 0.01}}),
                           path=os.path.join(path, "new"), progress=False)
    except cerebro.ConfigError as e:
        print("refused", e)
    """
)


@pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None,
    reason="root ignores file modes: dropping its capabilities needs setpriv",
)
def test_a_read_only_archived_run_loads(digits, run_copy, tmp_path):
    script = tmp_path / "read_only.py"
    script.write_text(READ_ONLY.format(tests=HERE))
    before, mtime = _files(run_copy), (run_copy / "cerebro.db").stat().st_mtime_ns
    for folder, _, names in os.walk(run_copy):
        for name in names:
            os.chmod(os.path.join(folder, name), 0o444)
    for folder, _, _ in os.walk(run_copy, topdown=False):
        os.chmod(folder, 0o555)
    command = [sys.executable, str(script), str(run_copy), digits.path]
    if os.geteuid() == 0:  # root without the capabilities that let it ignore file modes
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        for folder, _, _ in os.walk(run_copy):
            os.chmod(folder, 0o755)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "status completed models 2" in done.stdout and "state True" in done.stdout
    assert f"refused path='{run_copy}/new'" in done.stdout and "no permission" in done.stdout
    assert _files(run_copy) == before  # no -wal or -shm file was left
    assert (run_copy / "cerebro.db").stat().st_mtime_ns == mtime


# A driver that died without a word ---------------------------------------------------------------


def _record_status(path, status: str) -> None:
    store = RecordStore(open_engine(sqlite_url(str(path))), 1)
    store.set_experiment_status(status)
    store.close()


def test_running_without_a_driver_reads_as_interrupted(run_copy, capsys):
    import fcntl

    _record_status(run_copy, "running")  # as a driver killed with SIGKILL leaves it
    assert cerebro.load(run_copy).experiment["status"] == "interrupted"
    assert cerebro.control(run_copy).status == "interrupted"
    assert cli_main(["models", str(run_copy)]) == 0
    assert "interrupted" in _printed(capsys)
    with open(run_copy / ".lock", "w") as held:  # as a live driver holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert cerebro.load(run_copy).experiment["status"] == "running"
        assert cerebro.control(run_copy).status == "running"


def test_the_next_driver_records_that_the_last_one_was_lost(digits, tmp_path):
    path = tmp_path / "run"
    _experiment(digits, path).run()
    _record_status(path, "running")  # as a driver killed with SIGKILL leaves it
    result = _experiment(digits, path).run()
    assert result.experiment["status"] == "completed"
    assert [e["kind"] for e in result.events] == ["driver_lost"]
    again = _experiment(digits, path).run()  # a clean end is not a lost driver
    assert [e["kind"] for e in again.events] == ["driver_lost"]


SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import builders, cerebro
    if __name__ == "__main__":
        cerebro.Experiment(builders.mlp, {data!r},
                           cerebro.GridSearch({{"lr": cerebro.choice([0.01, 0.02, 0.03])}}),
                           epochs=3, metric="val_accuracy", mode="max",
                           backend=cerebro.LocalBackend(workers=1), path=sys.argv[1],
                           progress=False).run()
    """
)


@pytest.mark.slow  # ~40 s of a driver in a subprocess (the default run stays under 10 minutes)
def test_a_sigkilled_driver_reads_as_interrupted_and_its_successor_says_so(digits, tmp_path):
    script, path = tmp_path / "run.py", tmp_path / "run"
    script.write_text(SCRIPT.format(tests=HERE, data=digits.path))
    victim = subprocess.Popen([sys.executable, str(script), str(path)])
    try:
        assert wait_for_train_hops(path, 1, timeout=60, still=lambda: victim.poll() is None)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL, "the run ended before the kill landed"
    assert cerebro.load(path).experiment["status"] == "interrupted"
    done = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    resumed = cerebro.load(path)
    assert resumed.experiment["status"] == "completed"
    assert "driver_lost" in [e["kind"] for e in resumed.events]


# Paths that cannot be written -------------------------------------------------------------------


def _a_file(tmp_path) -> dict:
    (tmp_path / "taken").write_text("a file")
    return {"path": tmp_path / "taken"}


def _under_a_file(tmp_path) -> dict:
    (tmp_path / "taken").write_text("a file")
    return {"path": tmp_path / "taken" / "run"}


def _checkpoints_in_a_file(tmp_path) -> dict:
    (tmp_path / "taken").write_text("a file")
    return {"path": tmp_path / "run", "checkpoint_dir": tmp_path / "taken" / "ckpt"}


def _unwritable(tmp_path, monkeypatch) -> dict:
    # Tests run as root, which writes anywhere: report the folder unwritable, as os.access
    # does for other users (test_a_read_only_archived_run_loads drops root's privilege).
    (tmp_path / "locked").mkdir()
    real = os.access
    locked = str(tmp_path / "locked")
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if os.fspath(p) == locked else real(p, mode)
    )
    return {"path": tmp_path / "locked" / "run"}


@pytest.mark.parametrize(
    ("place", "argument", "said"),
    [
        (_a_file, "path", "it is a file"),
        (_under_a_file, "path", "taken is a file"),
        (_checkpoints_in_a_file, "checkpoint_dir", "taken is a file"),
        (_unwritable, "path", "no permission to write in"),
    ],
)
def test_a_path_that_cannot_be_written_is_refused_when_the_experiment_is_made(
    digits, tmp_path, monkeypatch, place, argument, said
):
    arguments = place(tmp_path, monkeypatch) if place is _unwritable else place(tmp_path)
    before = _files(tmp_path)
    backend = _backend()
    with pytest.raises(cerebro.ConfigError) as caught:
        _experiment(digits, backend=backend, **arguments)
    message = str(caught.value)
    assert caught.value.argument == argument and said in message, message
    assert str(arguments[argument]) in message, message
    assert _files(tmp_path) == before and not os.path.exists(tmp_path / "run")
    assert backend.pids() == [] and backend.starts == 0


def test_clearing_checkpoints_at_a_url_deletes_only_the_models_folders(tmp_path):
    import fsspec

    from cerebro.store import place

    url = f"memory://cerebro-tests/{tmp_path.name}/checkpoints"
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    fs.pipe_file(f"{root}/model-00000/state.pt", b"state")
    fs.pipe_file(f"{root}/model-00001/epoch-0000.pt", b"epoch")
    fs.pipe_file(f"{root}/keep.txt", b"a person's file")
    held = place.survey(str(tmp_path / "run"), url, own_records=True)
    assert held.checkpoints == ["model-00000", "model-00001"]
    with pytest.raises(cerebro.ConfigError, match="checkpoints of an earlier run exist"):
        place.check_claim(held, has_records=False, overwrite=False)
    place.clear(str(tmp_path / "run"), url)
    assert fs.cat_file(f"{root}/keep.txt") == b"a person's file"
    assert not fs.exists(f"{root}/model-00000") and not fs.exists(f"{root}/model-00001")
