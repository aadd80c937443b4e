"""Crash-safe checkpoints (sureid.checkpointing): complete or absent, never NaN, resume equal to
an uninterrupted run, "latest" picks the newest complete one, the linear alignment's projection
travels with them; and a loud failure when transformers changes what CheckpointingMixin
overrides."""

from __future__ import annotations

import inspect
import re
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import TrainerCallback

from sureid import SureidError
from sureid.checkpointing import (
    OVERRIDDEN_TRAINER_METHODS,
    PROJECTION_FILE,
    CheckpointingMixin,
    checkpoint_problem,
    latest_checkpoint,
    resolve_resume,
)
from sureid.trainer import SureidTrainer

from .test_trainer import _args, _student, _teacher, _train_logs, make_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("syn"))


# -- what the mixin overrides ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OVERRIDDEN_TRAINER_METHODS))
def test_transformers_still_has_the_methods_the_mixin_overrides(name):
    """The mixin overrides private methods of transformers.Trainer: a rename or a new signature
    in transformers must fail here, not silently bypass the crash-safe saving."""
    expected = list(OVERRIDDEN_TRAINER_METHODS[name])
    method = getattr(transformers.Trainer, name, None)
    assert callable(method), (
        f"transformers {transformers.__version__}: Trainer.{name} is gone; CheckpointingMixin "
        "overrides it: update sureid/checkpointing.py (and OVERRIDDEN_TRAINER_METHODS)"
    )
    params = list(inspect.signature(method).parameters)
    assert params[: len(expected)] == expected, (
        f"transformers {transformers.__version__}: Trainer.{name}{inspect.signature(method)} "
        f"no longer starts with {expected}; CheckpointingMixin overrides it: update "
        "sureid/checkpointing.py (and OVERRIDDEN_TRAINER_METHODS)"
    )
    assert name in vars(CheckpointingMixin), f"CheckpointingMixin does not override {name}"


def test_the_mixin_comes_before_transformers_trainer():
    mro = SureidTrainer.__mro__
    assert CheckpointingMixin in mro and transformers.Trainer in mro
    assert mro.index(CheckpointingMixin) < mro.index(transformers.Trainer)
    for name in OVERRIDDEN_TRAINER_METHODS:  # the mixin's methods are the ones that run
        assert getattr(SureidTrainer, name) is getattr(CheckpointingMixin, name), name


# -- checkpoint_problem and latest_checkpoint -----------------------------------------------------


def _fake_checkpoint(path, state='{"global_step": 1}'):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def test_checkpoint_problem_names_what_is_missing(tmp_path):
    good = _fake_checkpoint(tmp_path / "checkpoint-1")
    assert checkpoint_problem(good) is None
    assert checkpoint_problem(tmp_path / "nope") == f"no such folder: {tmp_path / 'nope'}"
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in checkpoint_problem(tmp_path / "file")
    no_state = _fake_checkpoint(tmp_path / "checkpoint-2", state=None)
    assert checkpoint_problem(no_state) == (
        f"{no_state} has no trainer_state.json (an interrupted save?)"
    )
    truncated = _fake_checkpoint(tmp_path / "checkpoint-3", state='{"global_st')
    assert "trainer_state.json is truncated or corrupt" in checkpoint_problem(truncated)
    empty = tmp_path / "checkpoint-4"
    empty.mkdir()
    assert "has no config.json, model.safetensors, trainer_state.json" in checkpoint_problem(empty)


def test_latest_checkpoint_skips_incomplete_and_staging_folders(tmp_path, caplog):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    _fake_checkpoint(tmp_path / "checkpoint-2")
    _fake_checkpoint(tmp_path / "checkpoint-10")  # numeric order, not the names'
    _fake_checkpoint(tmp_path / "checkpoint-12", state=None)  # incomplete
    _fake_checkpoint(tmp_path / "tmp-checkpoint-20")  # an interrupted save's staging folder
    _fake_checkpoint(tmp_path / "checkpoint-30-old")  # not a checkpoint-N name
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert "checkpoint-12" in caplog.text


# -- saving and resuming ------------------------------------------------------------------------


class _NanLearningRateAt(TrainerCallback):
    """From step ``step`` on, the update diverges while that step's loss is still finite."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step + 1 >= self.step:
            for group in optimizer.param_groups:
                group["lr"] = float("nan")


class _StepsRun(TrainerCallback):
    def __init__(self):
        self.done = []

    def on_step_end(self, args, state, control, **kwargs):
        self.done.append(state.global_step)


def test_a_diverging_update_is_never_saved(tmp_path, data):
    run = tmp_path / "run"
    args = _args(tmp_path, max_steps=3, save_strategy="steps", save_steps=1)
    trainer = SureidTrainer(
        model=_student(), args=args, train_dataset=data["train"], callbacks=[_NanLearningRateAt(2)]
    )
    good = re.escape(str(run / "checkpoint-1"))
    with pytest.raises(SureidError, match=f"NaN/inf at step 2 .*newest good checkpoint is {good}"):
        trainer.train()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1"]
    with safe_open(str(run / "checkpoint-1" / "model.safetensors"), "pt") as f:
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
    # a NaN learning rate from the first step
    args = _args(tmp_path / "b", max_steps=2, save_strategy="steps", save_steps=1)
    args.learning_rate = float("nan")
    trainer = SureidTrainer(model=_student(), args=args, train_dataset=data["train"])
    with pytest.raises(SureidError, match="at step 1 .*no checkpoint was written"):
        trainer.train()
    assert not list((tmp_path / "b" / "run").glob("*checkpoint-*"))


def test_save_model_refuses_nan_weights(tmp_path):
    student = _student()
    trainer = SureidTrainer(model=student, args=_args(tmp_path))
    with torch.no_grad():
        student.predictors[0].out_conv[-1].weight.fill_(float("inf"))
    with pytest.raises(SureidError, match=r"NaN/inf before saving the model \(first: predictors"):
        trainer.save_model(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_interrupted_save_leaves_no_checkpoint_and_latest_picks_a_complete_one(
    tmp_path, data, monkeypatch
):
    run = tmp_path / "run"
    args = _args(tmp_path, max_steps=3, save_strategy="steps", save_steps=1)
    save_states = SureidTrainer._save_optimizer_and_scheduler

    def ctrl_c_at_step_2(self, output_dir):  # the model is written, the trainer state not yet
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        save_states(self, output_dir)

    monkeypatch.setattr(SureidTrainer, "_save_optimizer_and_scheduler", ctrl_c_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        SureidTrainer(model=_student(), args=args, train_dataset=data["train"]).train()
    monkeypatch.undo()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1"]  # no half checkpoint-2

    # what an interrupted save of an older version left: weights, no trainer state
    shutil.copytree(run / "checkpoint-1", run / "checkpoint-5")
    (run / "checkpoint-5" / "trainer_state.json").unlink()
    assert "checkpoint-5 has no trainer_state.json" in checkpoint_problem(run / "checkpoint-5")
    assert latest_checkpoint(run) == str(run / "checkpoint-1")
    steps = _StepsRun()
    resumed = SureidTrainer(
        model=_student(seed=7), args=args, train_dataset=data["train"], callbacks=[steps]
    )
    with pytest.raises(SureidError, match="cannot resume: .*checkpoint-5 has no trainer_state"):
        resumed.train(resume_from_checkpoint=str(run / "checkpoint-5"))
    resumed.train(resume_from_checkpoint="latest")
    assert steps.done == [2, 3]  # continued after checkpoint-1
    assert checkpoint_problem(run / "checkpoint-3") is None
    assert not list(run.glob("tmp-*"))


def test_resume_latest_without_a_checkpoint_is_refused(tmp_path, data):
    trainer = SureidTrainer(model=_student(), args=_args(tmp_path), train_dataset=data["train"])
    with pytest.raises(SureidError, match="no complete checkpoint-N folder in .*'latest'"):
        trainer.train(resume_from_checkpoint="latest")


def test_resuming_says_where_from_for_latest_and_a_named_checkpoint(tmp_path, monkeypatch, caplog):
    """An explicit resume_from_checkpoint (`--resume PATH`) says "resuming from PATH", as
    "latest" does (it used to say nothing); what reaches transformers is the checked path."""
    handed = []
    monkeypatch.setattr(
        transformers.Trainer,
        "train",
        lambda self, **kw: handed.append(kw["resume_from_checkpoint"]),
    )
    run = tmp_path / "run"
    named = _fake_checkpoint(run / "checkpoint-4")
    _fake_checkpoint(run / "checkpoint-7")
    trainer = SureidTrainer(model=_student(), args=_args(tmp_path))
    with caplog.at_level("WARNING", logger="sureid.checkpointing"):
        trainer.train(resume_from_checkpoint=str(named))
        assert f"resuming from {named}" in caplog.text
        caplog.clear()
        trainer.train(resume_from_checkpoint="latest")
        assert f"resuming from {run / 'checkpoint-7'}, the newest complete checkpoint" in (
            caplog.text
        )
        caplog.clear()
        trainer.train()
        assert "resuming" not in caplog.text
    assert handed == [str(named), str(run / "checkpoint-7"), None]
    # the check alone, as `sureid train` runs it before loading data: silent with log=False
    with caplog.at_level("WARNING", logger="sureid.checkpointing"):
        assert resolve_resume("latest", run, log=False) == str(run / "checkpoint-7")
    assert "resuming" not in caplog.text
    with pytest.raises(SureidError, match="no complete checkpoint-N folder in"):
        resolve_resume("latest", tmp_path / "empty", log=False)


@pytest.mark.slow
def test_resume_continues_the_same_run(tmp_path, data):
    teacher = _teacher()
    full = SureidTrainer(
        model=_student(),
        args=_args(tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=data["train"],
        teacher=teacher,
    )
    full.train()
    expected = [e["loss_total"] for e in _train_logs(full)]
    resumed = SureidTrainer(
        model=_student(seed=7),  # other init: everything must come from the checkpoint
        args=_args(tmp_path / "a", max_steps=4, save_strategy="no"),
        train_dataset=data["train"],
        teacher=teacher,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "run" / "checkpoint-2"))
    got = [e["loss_total"] for e in _train_logs(resumed) if e["step"] > 2]
    assert len(got) == 2
    assert got == pytest.approx(expected[2:], rel=1e-5)


@pytest.mark.slow
def test_the_linear_alignments_projection_is_saved_and_restored(tmp_path, data):
    """The projection is trained with the student but is not part of it: each checkpoint
    carries it beside the optimizer state, and resuming loads it back."""
    teacher = _teacher()
    run = tmp_path / "run"
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, align="s2t-linear")
    first = SureidTrainer(model=_student(), args=args, train_dataset=data["train"], teacher=teacher)
    first.train()
    saved = load_file(str(run / "checkpoint-1" / PROJECTION_FILE))
    last = load_file(str(run / "checkpoint-2" / PROJECTION_FILE))
    assert set(saved) == {"weight", "bias"}
    assert torch.equal(last["weight"], first.align_projection.weight.detach().cpu())
    assert not torch.equal(saved["weight"], last["weight"])  # each checkpoint its own step's
    with safe_open(str(run / "checkpoint-2" / "model.safetensors"), "pt") as f:
        assert not any("align" in k or "projection" in k for k in f.keys())  # not the student's

    class _ProjectionAtFirstStep(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.seen:
                projection = resumed.align_projection
                self.seen = [t.detach().cpu().clone() for t in (projection.weight, projection.bias)]

    first_step = _ProjectionAtFirstStep()
    resumed = SureidTrainer(
        model=_student(seed=7),
        args=args,
        train_dataset=data["train"],
        teacher=teacher,
        callbacks=[first_step],
    )
    with torch.no_grad():  # another projection: the checkpoint's must replace it
        resumed.align_projection.weight.zero_()
        resumed.align_projection.bias.zero_()
    resumed.train(resume_from_checkpoint=str(run / "checkpoint-1"))
    weight, bias = first_step.seen  # step 2 starts from checkpoint-1's projection
    assert torch.equal(weight, saved["weight"]) and torch.equal(bias, saved["bias"])

    # a checkpoint of an interpolating run has no projection: resuming with a linear one fails
    (run / "checkpoint-1" / PROJECTION_FILE).unlink()
    again = SureidTrainer(model=_student(), args=args, train_dataset=data["train"], teacher=teacher)
    with pytest.raises(FileNotFoundError, match=f"{PROJECTION_FILE} is missing.*s2t-linear"):
        again.train(resume_from_checkpoint=str(run / "checkpoint-1"))
