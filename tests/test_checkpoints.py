"""Epoch checkpoints: kept by policy, checksummed in the records."""

from __future__ import annotations

import os

import builders
import pytest
from conftest import small_experiment

import cerebro
from cerebro.store import RecordStore, checkpoints, open_engine, sqlite_url


def test_keep_policy_rules():
    keep = checkpoints.epochs_to_keep
    assert keep("last_and_best", [0, 1, 2, 3], best=1) == {1, 3}
    assert keep("last_and_best", [0, 1, 2, 3], best=3) == {3}
    assert keep("last", [0, 1, 2, 3], best=1) == {3}
    assert keep("all", [0, 1, 2], best=0) == {0, 1, 2}
    assert keep(2, [0, 1, 2, 3], best=0) == {0, 2, 3}
    for bad in ("best", 0, -1, True):
        with pytest.raises(cerebro.ConfigError, match="keep_checkpoints="):
            checkpoints.check_policy(bad)


@pytest.mark.parametrize("policy", ["last_and_best", "all"])
def test_completed_run_keeps_checkpoints_by_policy_with_checksums(digits, tmp_path, policy):
    path = tmp_path / policy
    result = small_experiment(
        digits,
        path,
        search=cerebro.GridSearch({"lr": cerebro.choice([0.002, 0.05])}),
        epochs=3,
        keep_checkpoints=policy,
    ).run()
    rows = RecordStore(open_engine(sqlite_url(str(path))), 1).snapshot().checkpoints
    for model in result.models:
        mine = {r["epoch"]: r for r in rows if r["model_id"] == model.id}
        assert sorted(mine) == [0, 1, 2]  # every epoch was checkpointed and recorded
        best = max(model.history, key=lambda h: h["val_accuracy"])["epoch"]
        expected = {0, 1, 2} if policy == "all" else {2, best}
        kept = {e for e, r in mine.items() if not r["pruned"]}
        assert kept == expected
        for epoch, row in mine.items():
            assert os.path.exists(row["path"]) == (epoch in expected)
            if epoch in expected:
                assert checkpoints.verified(row["path"], row["checksum"])
        # The last epoch's checkpoint is the final state: the same weights load_model returns.
        last = mine[2]["path"]
        assert checkpoints.checksum(last) == checkpoints.checksum(
            os.path.join(path, "checkpoints", f"model-{model.id:05d}", "state.pt")
        )


def test_a_mirror_copies_prunes_and_fetches_checkpoints_by_checksum(digits, tmp_path):
    import fsspec

    url = f"memory://cerebro-tests/{tmp_path.name}"
    path = tmp_path / "run"
    result = cerebro.Experiment(
        builders.mlp,
        digits,
        cerebro.GridSearch({"lr": cerebro.choice([0.002, 0.05])}),
        epochs=3,
        backend=cerebro.LocalBackend(workers=2),
        path=path,
        progress=False,
        keep_checkpoints="last",
        checkpoint_mirror=url,
    ).run()
    memory = fsspec.filesystem("memory")
    mirror = checkpoints.Mirror(url, str(path / "checkpoints"))
    for model in result.models:
        local = os.path.join(path, "checkpoints", f"model-{model.id:05d}", "epoch-0002.pt")
        copies = memory.ls(mirror.url_of(os.path.dirname(local)).split("://")[1], detail=False)
        assert [c.rsplit("/", 1)[1] for c in copies] == ["epoch-0002.pt"]  # pruned with it
        digest = checkpoints.checksum(local)
        os.remove(local)
        assert mirror.fetch(local, digest) and checkpoints.checksum(local) == digest
        assert not mirror.fetch(local, "0" * 64)  # a copy that does not match is not kept
        assert not os.path.exists(local)
    assert result.experiment["config"]["checkpoint_mirror"] == url


def test_an_unusable_checkpoint_mirror_fails_before_any_work(digits, tmp_path):
    bad_options = [
        ("checkpoint_mirror", "nosuchfs://bucket/run"),
        ("checkpoint_mirror", 42),
        ("checkpoint_dir", "nosuchfs://bucket/run"),
        ("checkpoint_dir", 42),
    ]
    for argument, bad in bad_options:
        with pytest.raises(cerebro.ConfigError, match=f"{argument}="):
            cerebro.Experiment(
                builders.mlp,
                digits,
                cerebro.GridSearch({"lr": cerebro.choice([0.01])}),
                path=tmp_path / "run",
                progress=False,
                **{argument: bad},
            )
    assert not (tmp_path / "run").exists()


def _deterministic(digits, path, **options):
    return cerebro.Experiment(
        builders.mlp,
        digits,
        cerebro.GridSearch({"lr": cerebro.choice([0.002, 0.05])}),
        epochs=2,
        backend=cerebro.LocalBackend(workers=2),
        path=path,
        progress=False,
        deterministic=True,
        keep_checkpoints="all",
        **options,
    ).run()


def test_checkpoints_at_an_fsspec_url_give_the_same_results(digits, tmp_path):
    """Hop states and epoch checkpoints at a URL go through fsspec (uploads and downloads, no
    memory map, no hard links); ``local://`` is fsspec's local filesystem, reachable from the
    worker processes, so the whole path runs as it would against an object store."""
    import torch

    from cerebro import files

    url = f"local://{tmp_path}/store/checkpoints"
    at_url = _deterministic(digits, tmp_path / "url", checkpoint_dir=url)
    on_disk = _deterministic(digits, tmp_path / "disk")
    assert at_url.history.equals(on_disk.history)
    rows = RecordStore(open_engine(sqlite_url(str(tmp_path / "url"))), 1).snapshot().checkpoints
    assert len(rows) == 4 and all(r["path"].startswith(url) for r in rows)
    for row in rows:
        assert files.is_url(row["path"]) and checkpoints.verified(row["path"], row["checksum"])
    assert not (tmp_path / "url" / "checkpoints").exists()
    for model in on_disk.models:
        a, b = at_url.load_model(model.id), on_disk.load_model(model.id)
        assert all(
            torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
        )
    # Running it again continues from the records: nothing is trained twice.
    again = _deterministic(digits, tmp_path / "url", checkpoint_dir=url)
    assert len(again.hops) == len(at_url.hops)
