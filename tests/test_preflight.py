"""Preflight: a build that cannot train one step is refused before any worker starts, with a
ConfigError that names the argument and the configuration; a run in which every model failed
raises instead of returning quietly."""

from __future__ import annotations

import threading

import builders
import pytest
import torch
from conftest import state_equal

import cerebro
from cerebro import training
from cerebro.engine.building import ModelBuilder
from cerebro.engine.preflight import Preflight

# builder, what the message must name (the argument first), and the fix or the shapes it says.
BAD_BUILDS = [
    (builders.batch_size_zero, ["ModelSpec.batch_size=0", "an integer >= 1"]),
    (builders.optimizer_of_another_model, ["ModelSpec.optimizer", "model.parameters()"]),
    (builders.optimizer_replaced_after_build, ["ModelSpec.optimizer", "model.parameters()"]),
    (builders.loss_per_row, ["loss=CrossEntropyLoss()", "one value per row", "reduction='mean'"]),
    (
        builders.loss_for_other_targets,
        [
            "loss=BCEWithLogitsLoss()",
            "outputs of shape (8, 10)",
            "targets of shape (8,) and dtype torch.int64",
        ],
    ),
    (builders.metric_that_raises, ["metrics['broken']", "metric failed on purpose"]),
    (builders.metric_per_row, ["metrics['per_row']", "one value per row", ".mean()"]),
    (builders.wrong_input_size, ["model='Sequential'", "shape (8, 8, 8)", "(8, 8) per row"]),
    # A state that a worker writes but cannot read back (torch.load(weights_only=True)).
    (
        builders.optimizer_state_holds_an_object,
        ["optimizer='Adam'", "state_dict()['param_groups'][0]['schedule'] is a fractions.Fraction"],
    ),
    (
        builders.model_state_holds_an_object,
        ["model='_WithVocabulary'", "state_dict()['_extra_state'] is a builders.Vocabulary"],
    ),
]


def _experiment(digits, path, build, backend=None, space=None, search=None, epochs=1):
    space = space or {"lr": cerebro.choice([0.01, 0.02])}
    return cerebro.Experiment(
        build,
        digits,
        search or cerebro.GridSearch(space),
        epochs=epochs,
        metric="val_accuracy",
        mode="max",
        backend=backend or cerebro.LocalBackend(workers=1),
        path=path,
        progress=False,
    )


@pytest.mark.parametrize(
    ("build", "named"), BAD_BUILDS, ids=[build.__name__ for build, _ in BAD_BUILDS]
)
def test_a_build_that_cannot_train_one_step_fails_the_run_before_any_worker_starts(
    digits, tmp_path, monkeypatch, build, named
):
    backend = cerebro.LocalBackend(workers=1)

    def start(*args, **kwargs):
        raise AssertionError("workers started")

    monkeypatch.setattr(backend, "start", start)
    exp = _experiment(digits, tmp_path / "run", build, backend)
    with pytest.raises(cerebro.ConfigError) as caught:
        exp.run()
    message = str(caught.value)
    assert message.startswith(named[0]), message
    for text in [*named[1:], "configuration {'lr': 0.01}"]:
        assert text in message, message
    assert not (tmp_path / "run" / "cerebro.db").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert backend.pids() == []


def test_preflight_leaves_each_models_initial_state_as_build_made_it(digits, tmp_path):
    builder = ModelBuilder(builders.mlp, digits, "val_accuracy", seed=5)
    # dropout, Adam and an LR scheduler: all have state to disturb
    for model_id, lr in enumerate([0.01, 0.02]):
        params = {"lr": lr, "dropout": 0.5}
        initial = builder.initial_state(model_id, params, strict=True)
        assert initial.error is None and initial.state is not None
        state = initial.state
        seed = training.init_seed(5, model_id)
        expected = training.build_spec(builders.mlp, params, seed)
        expected_rng = torch.get_rng_state()  # the stream the model's first hop continues
        assert state_equal(state["model"], expected.model.state_dict())
        assert state_equal(state["optimizer"], expected.optimizer.state_dict())
        assert state_equal(state["lr_scheduler"], expected.lr_scheduler.state_dict())
        assert torch.equal(state["rng"], expected_rng)


class _GoodThenBad(cerebro.Search):
    """Proposes a good configuration, then, once it runs, one whose loss is per row."""

    def propose(self, trials):
        return [[{"bad": False}], [{"bad": True}]][len(trials)] if len(trials) < 2 else []

    def is_finished(self, trials):
        return len(trials) >= 2


def test_a_configuration_proposed_later_that_fails_preflight_fails_alone(digits, tmp_path):
    exp = _experiment(digits, tmp_path / "run", builders.mlp_or_loss_per_row, search=_GoodThenBad())
    result = exp.run()
    by_bad = {m.params["bad"]: m for m in result.models}
    assert by_bad[False].status == "completed"
    assert by_bad[True].status == "failed"
    assert by_bad[True].error.startswith("loss=CrossEntropyLoss()")
    assert "configuration {'bad': True}" in by_bad[True].error
    assert "reduction='mean'" in by_bad[True].error
    assert set(result.hops.model_id) == {by_bad[False].id}


def test_a_run_in_which_every_model_failed_raises_after_writing_its_records(digits, tmp_path):
    # Neither failure is preflight's to see: build raises, and a NaN loss is a number.
    space = {"fail": cerebro.choice(["build", "nan"])}
    exp = _experiment(digits, tmp_path / "run", builders.flaky, space=space)
    with pytest.raises(cerebro.AllModelsFailed) as caught:
        exp.run()
    message = str(caught.value)
    assert message.startswith("2 of 2 models failed"), message
    assert "model 0 with params {'fail': 'build'}" in message
    assert "build failed on purpose" in message  # the traceback's last line
    loaded = cerebro.load(tmp_path / "run")
    assert {m.status for m in loaded.models} == {"failed"}
    assert "non-finite" in next(m for m in loaded.models if m.params["fail"] == "nan").error
    assert loaded.experiment["status"] == "completed"
    assert isinstance(caught.value, cerebro.CerebroError)


class _HoldsALock(torch.nn.Module):
    """A module that copy.deepcopy cannot copy (it holds a lock)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def forward(self, x):
        return x


def _uncopyable_loss_per_row(params: dict) -> cerebro.ModelSpec:
    spec = builders.loss_per_row(params)
    spec.model.insert(0, _HoldsALock())
    return spec


def test_a_spec_that_cannot_be_copied_is_tried_on_a_fresh_build(digits):
    spec = _uncopyable_loss_per_row({})
    before = {k: v.clone() for k, v in spec.model.state_dict().items()}
    with pytest.raises(cerebro.ConfigError, match="one value per row"):
        Preflight(digits, _uncopyable_loss_per_row).check(spec, {})
    assert state_equal(spec.model.state_dict(), before)
