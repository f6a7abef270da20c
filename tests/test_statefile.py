"""Cerebro's state file format: what a worker writes after each hop and the next one reads."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import builders
import pytest
import torch
from conftest import state_equal

from cerebro import statefile, training
from cerebro.engine.recovery import UNUSABLE_STATE


def _training_state() -> dict:
    """A real state after two Adam steps: weights, moments, step counts, the random stream."""
    torch.manual_seed(0)
    spec = training.build_spec(builders.mlp, {"lr": 0.01}, init_seed=3)
    for _ in range(2):
        spec.optimizer.zero_grad()
        loss = spec.model(torch.rand(5, 8, 8)).sum()
        loss.backward()
        spec.optimizer.step()
    return {
        "model": spec.model.state_dict(),
        "optimizer": spec.optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "counters": {"version": 2, "epoch": 0, "hops": [{"shard": 1, "rows": 5}]},
    }


def test_a_training_state_round_trips_bit_for_bit(tmp_path):
    state = _training_state()
    path = str(tmp_path / "state.pt")
    training.save_state(state, path)
    with open(path, "rb") as f:
        assert statefile.is_statefile(f.read(64))
    loaded = training.load_state(path)
    assert state_equal(loaded, state)
    assert isinstance(loaded["model"], OrderedDict)
    # What a worker does with it: a model and optimizer restored from it go on as the original.
    spec = training.build_spec(builders.mlp, {"lr": 0.01}, init_seed=None)
    training.restore_state(spec, loaded, torch.device("cpu"))
    assert state_equal(spec.model.state_dict(), state["model"])


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(7, dtype=torch.int64),
        torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
        torch.tensor([True, False, True]),
        torch.zeros(0, 3),  # no bytes at all
        torch.tensor(3.0),  # a scalar
        torch.arange(12.0).view(3, 4).t(),  # not contiguous
        torch.randn(3, dtype=torch.complex64),
    ],
    ids=["int64", "bfloat16", "bool", "empty", "scalar", "transposed", "complex"],
)
def test_every_dense_dtype_and_shape_comes_back_equal(tmp_path, tensor):
    path = str(tmp_path / "s")
    statefile.write({"t": tensor, "pair": (tensor, 1), "set": {1, 2}}, path)
    back = statefile.read(path)
    assert back["t"].dtype == tensor.dtype and back["t"].shape == tensor.shape
    assert torch.equal(back["t"], tensor) and torch.equal(back["pair"][0], tensor)
    assert back["pair"][1] == 1 and back["set"] == {1, 2}


def test_tensors_read_are_private_copies_on_write_and_outlive_the_file(tmp_path):
    path = str(tmp_path / "s")
    statefile.write({"w": torch.ones(4)}, path)
    first, second = statefile.read(path), statefile.read(path)
    os.remove(path)  # a handover file deleted while its reader still uses the views
    first["w"].add_(1)  # a worker's in-place optimizer step
    assert first["w"].tolist() == [2.0] * 4 and second["w"].tolist() == [1.0] * 4


def test_a_state_with_objects_it_cannot_hold_is_written_by_torch_instead(tmp_path):
    """A custom object (a scheduler's, say) is refused by this format's reader, so the writer
    refuses it too and the state goes to ``torch.save``, which ``load_state`` also reads."""
    state = {"model": {"w": torch.ones(2)}, "extra": torch.device("cpu")}
    with pytest.raises(statefile.Unsupported, match="state files hold no torch.device"):
        statefile.write(state, str(tmp_path / "refused"))
    path = str(tmp_path / "state.pt")
    training.save_state(state, path)
    with open(path, "rb") as f:
        assert not statefile.is_statefile(f.read(64))
    assert training.load_state(path)["extra"] == torch.device("cpu")


def test_a_file_that_would_run_code_is_refused(tmp_path):
    header = pickle.dumps(os.system)
    path = tmp_path / "evil"
    path.write_bytes(statefile.MAGIC + len(header).to_bytes(8, "little") + header)
    with pytest.raises(pickle.UnpicklingError, match="state files hold no posix.system"):
        training.load_state(str(path))


@pytest.mark.parametrize("keep", [0, 10, 40, -8], ids=["empty", "magic", "header", "data"])
def test_a_truncated_file_reads_as_unusable_for_recovery(tmp_path, keep):
    """A write cut short (a crash without the atomic rename, a bad disk) raises one of the
    errors recovery treats as an unusable state, so it falls back to an older checkpoint."""
    path = str(tmp_path / "state.pt")
    training.save_state(_training_state(), path)
    with open(path, "rb") as f:
        payload = f.read()
    with open(path, "wb") as f:
        f.write(payload[: keep if keep >= 0 else len(payload) + keep])
    with pytest.raises(UNUSABLE_STATE):
        training.load_state(path)


def test_a_state_at_an_fsspec_url_round_trips(tmp_path):
    state = _training_state()
    url = f"memory://{tmp_path.name}/state.pt"
    training.save_state(state, url)
    assert state_equal(training.load_state(url), state)
