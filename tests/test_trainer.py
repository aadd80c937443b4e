"""A few training steps of teacher and student on tiny configs: logged terms, frozen teacher,
token guidance (from the teacher, or without one from the student as it started), the
predictors' learning rate, the NaN stop, evaluation equal to evaluate_model's and the opt-in
token-selection check. Checkpoints and resuming: test_checkpointing.py; the command line:
test_cli_train.py."""

from __future__ import annotations

import ast
import dataclasses
import json
import re

import pytest
import torch
from safetensors import safe_open

from sureid import (
    SureidError,
    SureidStudentConfig,
    SureidStudentModel,
    SureidTeacherConfig,
    SureidTeacherModel,
)
from sureid.data.datasets import load_reid_dataset
from sureid.data.synthetic import make_synthetic_reid
from sureid.evaluation import evaluate_model
from sureid.trainer import SureidTrainer, SureidTrainingArguments, has_hts

from .conftest import TINY

NUM_IDS = 8
# the metrics the token-selection check adds for an HTS student on the synthetic set (which has
# visible-body and occluder masks) without a guide: no oracle, no Spearman correlation
CHECK_WITHOUT_GUIDE = {"random_R1", "random_mAP", "random_R1_min", "random_R1_max"}
CHECK_WITHOUT_GUIDE |= {"body_share", "body_chance", "body_auc"}
CHECK_WITHOUT_GUIDE |= {f"body_share_stage{j}" for j in (1, 2, 3)}
CHECK_WITHOUT_GUIDE |= {"occluder_share", "occluder_chance"}
CHECK_WITHOUT_GUIDE |= {"sampling_overlap", "sampling_overlap_chance"}
CHECK_WITHOUT_GUIDE |= {
    f"{name}_{m}" for name in ("stage1_ranking", "occluder_dropped") for m in ("R1", "mAP")
}
REID_METRICS = {"eval_R1", "eval_R5", "eval_mAP", "eval_mINP"}

pytestmark = pytest.mark.usefixtures("one_thread")


def make_data(folder):
    """The tiny synthetic set these tests train on: NUM_IDS train identities, 64x32."""
    root = make_synthetic_reid(
        folder, num_train_ids=NUM_IDS, num_test_ids=4, size=(64, 32), images_per_train_id=4
    )
    return load_reid_dataset("synthetic", root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("syn"))


def _args(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=8,
        num_instances=2,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        seed=0,
        data_seed=0,
    )
    return SureidTrainingArguments(**{**defaults, **overrides})


def _teacher(seed=0):
    torch.manual_seed(seed)
    return SureidTeacherModel(SureidTeacherConfig(**TINY, num_identities=NUM_IDS))


def _student(seed=1, **overrides):
    torch.manual_seed(seed)
    config = SureidStudentConfig(
        **TINY, sparsify_layers=(1, 3, 5), num_identities=NUM_IDS, **overrides
    )
    return SureidStudentModel(config)


def _train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_paper_defaults():
    args = SureidTrainingArguments(output_dir="unused", use_cpu=True)
    assert args.learning_rate == 0.008 and args.weight_decay == 1e-4
    assert args.optim == "sgd" and "momentum=0.9" in args.optim_args
    assert args.lr_scheduler_type == "cosine" and args.num_train_epochs == 200
    assert args.per_device_train_batch_size == 64 and args.num_instances == 4
    assert (args.alpha, args.beta, args.lambda_ratio, args.lambda_kl, args.kd_temperature) == (
        1.0,
        1.0,
        2.0,
        0.1,
        1.0,
    )
    assert args.noda and args.align == "t2s-interp"
    # beyond the paper, off: no token guidance, the predictors at the model's learning rate
    assert args.lambda_token == 0.0 and args.predictor_learning_rate is None
    assert args.logging_steps == 500  # transformers' own default, no longer overridden
    with pytest.raises(ValueError, match="multiple of num_instances"):
        SureidTrainingArguments(output_dir="unused", per_device_train_batch_size=30, use_cpu=True)


def test_unused_columns_are_always_kept_and_bad_values_are_refused():
    """The collators read image, pid, camid and path: remove_unused_columns is forced False."""
    args = SureidTrainingArguments(output_dir="unused", use_cpu=True, remove_unused_columns=True)
    assert args.remove_unused_columns is False
    for bad, message in (
        (dict(lambda_token=-0.5), "lambda_token must be >= 0"),
        (dict(predictor_learning_rate=0.0), "predictor_learning_rate must be positive"),
        (dict(align="t2s-cosine"), "align must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            SureidTrainingArguments(output_dir="unused", use_cpu=True, **bad)


def test_every_sureid_training_field_has_an_args_line_with_its_default():
    doc = SureidTrainingArguments.__doc__
    fields = {f.name: f for f in dataclasses.fields(SureidTrainingArguments)}
    for name in SureidTrainingArguments.__annotations__:  # the fields this class sets
        line = re.search(rf"^\s+{name} \(`.+`, \*optional\*, defaults to `(.+)`\):$", doc, re.M)
        assert line, f"no Args line for {name}"
        assert ast.literal_eval(line.group(1)) == fields[name].default, name
    assert "Example:" in doc and ">>> " in doc


def test_has_hts_only_for_students_that_drop_tokens():
    assert has_hts(_student())
    assert not has_hts(_student(keep_rate=1.0)) and not has_hts(_teacher())
    assert not has_hts(torch.nn.Linear(2, 2))  # no config at all


def test_teacher_training_logs_its_terms_and_learns(tmp_path, data):
    model = _teacher()
    before = model.encoder.blocks[0].mlp.fc1.weight.detach().clone()
    # token guidance needs predictors: a dense model trains without it (and without a guide)
    args = _args(tmp_path, lambda_token=0.5)
    trainer = SureidTrainer(model=model, args=args, train_dataset=data["train"])
    assert trainer.guide is None
    trainer.train()
    logs = _train_logs(trainer)
    assert len(logs) == 3
    for entry in logs:
        assert {"loss_cls", "loss_tri", "loss_total"} <= entry.keys()
        assert not {"loss_kd", "loss_ratio", "loss_token"} & entry.keys()
        assert entry["loss_total"] == pytest.approx(entry["loss_cls"] + entry["loss_tri"], rel=1e-5)
    assert not torch.equal(before, model.encoder.blocks[0].mlp.fc1.weight)


def test_the_default_is_the_papers_loss(tmp_path, data):
    """Eq. (14) alone: per-token Gumbel decisions steered by the ratio loss, no guidance term."""
    trainer = SureidTrainer(
        model=_student(), args=_args(tmp_path), train_dataset=data["train"], teacher=_teacher()
    )
    assert trainer.guide is None
    trainer.train()
    logs = _train_logs(trainer)
    assert len(logs) == 3
    for entry in logs:
        assert "loss_token" not in entry
        total = entry["loss_kd"] + 2.0 * entry["loss_ratio"] + entry["loss_cls"] + entry["loss_tri"]
        assert entry["loss_total"] == pytest.approx(total, rel=1e-4)
        assert entry["loss_ratio"] > 0  # the sampled share is not exactly the target


def test_distillation_with_token_guidance_logs_every_term_and_keeps_the_teacher_frozen(
    tmp_path, data
):
    """lambda_token > 0 with a teacher (beyond the paper): the guidance reads the teacher's
    attention from its NPKD pass, so no guide model is made; the loss has every term."""
    teacher, student = _teacher(), _student(hts_sampling="gumbel-topk")
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    args = _args(tmp_path, save_strategy="steps", save_steps=3, lambda_token=1.0)
    trainer = SureidTrainer(model=student, args=args, train_dataset=data["train"], teacher=teacher)
    assert trainer.guide is None
    trainer.train()
    logs = _train_logs(trainer)
    assert len(logs) == 3
    expected = {
        "loss_cls",
        "loss_tri",
        "loss_ratio",
        "loss_kl",
        "loss_feat",
        "loss_kd",
        "loss_token",
        "loss_total",
    }
    expected |= {f"kept_ratio_stage{j}" for j in (1, 2, 3)}
    counts = student.config.stage_keep_counts
    for entry in logs:
        assert expected <= entry.keys()
        # (14): alpha (L_KD + lambda_ratio L_ratio) + beta (L_cls + L_tri), alpha = beta = 1,
        # plus lambda_token L_token (token guidance)
        total = entry["loss_kd"] + 2.0 * entry["loss_ratio"] + entry["loss_cls"] + entry["loss_tri"]
        total += entry["loss_token"]
        assert entry["loss_total"] == pytest.approx(total, rel=1e-4)
        assert entry["loss_token"] > 0
        # Gumbel-top-k keeps exactly k tokens per stage: the ratio loss is 0
        assert entry["loss_ratio"] == 0.0
        for j, k in enumerate(counts, start=1):
            assert entry[f"kept_ratio_stage{j}"] == pytest.approx(k / student.config.num_patches)
        # the feature term is the channel mean (the only reduction left)
        assert entry["loss_kd"] == pytest.approx(
            0.1 * entry["loss_kl"] + entry["loss_feat"], rel=1e-4
        )
    # frozen: eval mode, no gradients, weights untouched (BN running stats included)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())
    # the checkpoint holds the student and nothing of the teacher
    ckpt = tmp_path / "run" / "checkpoint-3"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(student.state_dict().keys())
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "sureid-student"


def test_the_papers_recipe_without_teacher_adds_the_ratio_loss(tmp_path, data):
    """hts_sampling="gumbel", lambda_token 0 (the defaults): the paper's "+HTS" row."""
    trainer = SureidTrainer(
        model=_student(hts_sampling="gumbel"),
        args=_args(tmp_path, max_steps=1),
        train_dataset=data["train"],
    )
    assert trainer.guide is None
    trainer.train()
    (entry,) = _train_logs(trainer)
    assert "loss_kd" not in entry and "loss_token" not in entry
    total = entry["loss_cls"] + entry["loss_tri"] + 2.0 * entry["loss_ratio"]
    assert entry["loss_total"] == pytest.approx(total, rel=1e-4)
    assert entry["loss_ratio"] > 0  # per-token sampling misses the targets


def test_without_teacher_the_guide_is_the_student_as_it_started(tmp_path, data):
    """Token guidance with no teacher: a frozen copy of the initial student supplies the
    class-token attention; training changes the student, never the guide."""
    student = _student()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = SureidTrainer(
        model=student,
        args=_args(tmp_path, max_steps=2, lambda_token=0.5),
        train_dataset=data["train"],
    )
    assert trainer.guide is not None and trainer.guide is not student
    assert not trainer.guide.training
    assert all(not p.requires_grad for p in trainer.guide.parameters())
    trainer.train()
    logs = _train_logs(trainer)
    assert len(logs) == 2
    for entry in logs:
        assert entry["loss_token"] > 0
        total = entry["loss_cls"] + entry["loss_tri"] + 2.0 * entry["loss_ratio"]
        assert entry["loss_total"] == pytest.approx(total + 0.5 * entry["loss_token"], rel=1e-4)
    for name, value in trainer.guide.state_dict().items():
        assert torch.equal(value, start[name]), name
    assert not torch.equal(
        student.state_dict()["predictors.0.out_conv.4.weight"],
        start["predictors.0.out_conv.4.weight"],
    )


def test_predictor_learning_rate(tmp_path, data):
    """The predictors get their own learning rate, in their own parameter groups (same other
    settings); the rest keeps the model's; both learn."""
    student = _student()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    args = _args(tmp_path, max_steps=2, predictor_learning_rate=0.01)
    trainer = SureidTrainer(model=student, args=args, train_dataset=data["train"])
    trainer.create_optimizer()
    predictor_ids = {id(p) for p in student.predictors.parameters()}
    groups = trainer.optimizer.param_groups
    seen = set()
    for group in groups:
        ids = {id(p) for p in group["params"]}
        assert not ids or ids <= predictor_ids or not ids & predictor_ids  # never mixed
        if ids and ids <= predictor_ids:
            assert group["lr"] == 0.01
            seen.add(group["weight_decay"])
        elif ids:
            assert group["lr"] == args.learning_rate
    assert seen == {0.0, args.weight_decay}  # split as the model's groups are: decay and not
    assert predictor_ids == {id(p) for g in groups for p in g["params"] if id(p) in predictor_ids}
    trainer.train()
    # the schedule scales each group from the learning rate it started with
    initial = {g["initial_lr"] for g in trainer.optimizer.param_groups if g["params"]}
    assert initial == {0.01, args.learning_rate}
    moved = {n for n, v in student.state_dict().items() if not torch.equal(v, start[n])}
    assert "predictors.0.out_conv.4.weight" in moved
    assert "encoder.blocks.0.attn.qkv.weight" in moved


def test_linear_alignment_trains_its_projection(tmp_path, data):
    teacher = _teacher()
    args = _args(tmp_path, max_steps=2, align="t2s-linear")
    trainer = SureidTrainer(
        model=_student(), args=args, train_dataset=data["train"], teacher=teacher
    )
    assert (
        trainer.align_projection.in_features == 64 and trainer.align_projection.out_features == 64
    )
    before = trainer.align_projection.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.align_projection.weight)
    # interpolation has nothing to train
    plain = SureidTrainer(model=_student(), args=_args(tmp_path), teacher=teacher)
    assert plain.align_projection is None


def test_each_step_updates_the_projection_with_that_steps_gradient(tmp_path, data):
    """The projection is not part of the model, whose gradients the trainer zeroes after each
    step: its own must start every step empty too (not carry the sum of all earlier steps'),
    as the student's do."""
    from transformers import TrainerCallback

    seen = []

    class GradientsAtStepBegin(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            def leftover(params):
                return max((0.0 if p.grad is None else float(p.grad.abs().max())) for p in params)

            seen.append(
                (leftover(model.parameters()), leftover(trainer.align_projection.parameters()))
            )

    args = _args(tmp_path, max_steps=3, align="t2s-linear")
    trainer = SureidTrainer(
        model=_student(),
        args=args,
        train_dataset=data["train"],
        teacher=_teacher(),
        callbacks=[GradientsAtStepBegin()],
    )
    trainer.train()
    assert len(seen) == 3
    assert all(student == 0.0 for student, _ in seen)  # what transformers does for the model
    assert [projection for _, projection in seen] == [0.0, 0.0, 0.0]


def test_mismatched_identities_are_refused(tmp_path, data):
    teacher = SureidTeacherModel(SureidTeacherConfig(**TINY, num_identities=NUM_IDS + 1))
    with pytest.raises(SureidError, match="num_identities"):
        SureidTrainer(
            model=_student(), args=_args(tmp_path), train_dataset=data["train"], teacher=teacher
        )
    with pytest.raises(TypeError, match="SureidTrainingArguments"):
        from transformers import TrainingArguments

        SureidTrainer(model=_student(), args=TrainingArguments(output_dir=str(tmp_path)))


def test_the_trainer_has_no_guide_keyword(tmp_path):
    """``guide=`` is gone: without a teacher the guide is always the student as it started."""
    with pytest.raises(TypeError, match="guide"):
        SureidTrainer(model=_student(), args=_args(tmp_path), guide=_teacher())


def test_nan_loss_stops_training_and_names_the_term(tmp_path, data):
    from sureid.data.noda import build_train_collator

    plain = build_train_collator((64, 32), noda=False)

    def poisoned(samples):
        batch = plain(samples)
        batch["pixel_values"][:] = float("nan")
        return batch

    args = _args(tmp_path, save_strategy="steps", save_steps=1)
    trainer = SureidTrainer(
        model=_student(), args=args, train_dataset=data["train"], train_collator=poisoned
    )
    with pytest.raises(SureidError, match=r"loss term 'cls' is nan at step 0.*none written yet"):
        trainer.train()
    assert not list((tmp_path / "run").glob("*checkpoint-*"))


def test_evaluate_reports_what_evaluate_model_reports(tmp_path, data):
    """SureidTrainer.evaluate and evaluation.evaluate_model on the same checkpoint agree; by
    default an HTS student gets no token-selection check."""
    _student().save_pretrained(tmp_path / "ckpt")
    model = SureidStudentModel.from_pretrained(tmp_path / "ckpt")
    trainer = SureidTrainer(
        model=model,
        args=_args(tmp_path, per_device_eval_batch_size=3),
        eval_dataset=data,
        eval_protocol="market",
    )
    got = trainer.evaluate()
    expected = evaluate_model(
        str(tmp_path / "ckpt"), data["query"], data["gallery"], "market", progress=False
    ).metrics
    assert {k for k in got if k.startswith("eval_")} == REID_METRICS
    assert got["eval_R1"] == pytest.approx(expected.rank(1), abs=1e-6)
    assert got["eval_R5"] == pytest.approx(expected.rank(5), abs=1e-6)
    assert got["eval_mAP"] == pytest.approx(expected.mAP, abs=1e-6)
    assert got["eval_mINP"] == pytest.approx(expected.mINP, abs=1e-6)
    assert 0.0 < expected.mAP < 1.0  # random weights: neither a perfect nor an empty ranking
    with pytest.raises(SureidError, match="'query' and 'gallery'"):
        trainer.evaluate(eval_dataset={"query": data["query"]})


def test_evaluate_runs_the_token_selection_check_only_when_asked(tmp_path, data):
    """check_token_selection=True: an HTS student's evaluation adds the predictor check
    (no teacher, no guidance: no guide, hence no oracle and no Spearman); the R1 / mAP of the
    student itself are those of the plain evaluation."""
    student = _student()
    args = _args(tmp_path, per_device_eval_batch_size=16)
    plain = SureidTrainer(model=student, args=args, eval_dataset=data).evaluate()
    checked = SureidTrainer(
        model=student, args=args, eval_dataset=data, check_token_selection=True
    ).evaluate()
    assert {k for k in plain if k.startswith("eval_")} == REID_METRICS
    assert {k for k in checked if k.startswith("eval_")} == REID_METRICS | {
        f"eval_{name}" for name in CHECK_WITHOUT_GUIDE
    }
    for name in REID_METRICS:
        assert checked[name] == pytest.approx(plain[name], abs=1e-6), name
    assert checked["eval_random_R1_min"] <= checked["eval_random_R1"]
    assert checked["eval_random_R1"] <= checked["eval_random_R1_max"]
    assert 0.0 < checked["eval_body_chance"] < 1.0
    # a dense model has no predictors to check, asked or not
    dense = SureidTrainer(
        model=_teacher(), args=args, eval_dataset=data, check_token_selection=True
    )
    assert {k for k in dense.evaluate() if k.startswith("eval_")} == REID_METRICS


def test_the_token_selection_check_compares_with_the_guide(tmp_path, data):
    """With token guidance and no teacher, the check's guide is the student as it started:
    its top-k (the oracle), the Spearman correlations and the guide's body measures join."""
    args = _args(tmp_path, per_device_eval_batch_size=16, lambda_token=0.5)
    trainer = SureidTrainer(
        model=_student(), args=args, eval_dataset=data, check_token_selection=True
    )
    got = trainer.evaluate()
    guided = {"guide_R1", "guide_mAP", "spearman", "spearman_attention_norm"}
    guided |= {"guide_body_share", "guide_body_auc"}
    assert {k for k in got if k.startswith("eval_")} == REID_METRICS | {
        f"eval_{name}" for name in CHECK_WITHOUT_GUIDE | guided
    }
    assert -1.0 <= got["eval_spearman"] <= 1.0 and 0.0 <= got["eval_guide_R1"] <= 1.0
