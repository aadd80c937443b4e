"""A few training steps of teacher and student on tiny configs: logged terms, frozen teacher,
checkpoints without the teacher, resume equal to an uninterrupted run, the NaN stop, evaluation
equal to evaluate_model's, --eval-every-epochs N honoured."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import TrainerCallback, TrainerControl, TrainerState

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
from sureid.losses import expected_ratio_loss, npkd_loss
from sureid.trainer import (
    EvaluateEveryEpochs,
    SureidTrainer,
    SureidTrainingArguments,
    train_main,
)

from .conftest import TINY

NUM_IDS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_synthetic_reid(
        tmp_path_factory.mktemp("syn"),
        num_train_ids=NUM_IDS,
        num_test_ids=4,
        size=(64, 32),
        images_per_train_id=4,
    )
    return load_reid_dataset("synthetic", root)


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
    with pytest.raises(ValueError, match="multiple of num_instances"):
        SureidTrainingArguments(output_dir="unused", per_device_train_batch_size=30, use_cpu=True)


def test_teacher_training_logs_its_terms_and_learns(tmp_path, data):
    model = _teacher()
    before = model.encoder.blocks[0].mlp.fc1.weight.detach().clone()
    trainer = SureidTrainer(model=model, args=_args(tmp_path), train_dataset=data["train"])
    trainer.train()
    logs = _train_logs(trainer)
    assert len(logs) == 3
    for entry in logs:
        assert {"loss_cls", "loss_tri", "loss_total"} <= entry.keys()
        assert "loss_kd" not in entry and "loss_ratio" not in entry
        assert entry["loss_total"] == pytest.approx(entry["loss_cls"] + entry["loss_tri"], rel=1e-5)
    assert not torch.equal(before, model.encoder.blocks[0].mlp.fc1.weight)


def test_the_default_is_the_papers_loss(tmp_path, data):
    """Eq. (14) alone: per-token Gumbel decisions steered by the ratio loss, no guidance term."""
    trainer = SureidTrainer(
        model=_student(), args=_args(tmp_path), train_dataset=data["train"], teacher=_teacher()
    )
    trainer.train()
    for entry in _train_logs(trainer):
        assert "loss_token" not in entry
        total = entry["loss_kd"] + 2.0 * entry["loss_ratio"] + entry["loss_cls"] + entry["loss_tri"]
        assert entry["loss_total"] == pytest.approx(total, rel=1e-4)
        assert entry["loss_ratio"] > 0  # the sampled share is not exactly the target


def test_distillation_logs_every_term_and_keeps_the_teacher_frozen(tmp_path, data):
    # the guided recipe (beyond the paper), whose loss has every term
    teacher, student = _teacher(), _student(hts_sampling="gumbel-topk")
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    args = _args(tmp_path, save_strategy="steps", save_steps=3, token_guidance="cls-attention")
    trainer = SureidTrainer(model=student, args=args, train_dataset=data["train"], teacher=teacher)
    trainer.train()
    logs = _train_logs(trainer)
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
        assert entry["loss_kd"] == pytest.approx(
            0.1 * entry["loss_kl"] + entry["loss_feat"], rel=1e-4
        )
        assert (
            0
            <= entry["kept_ratio_stage3"]
            <= entry["kept_ratio_stage2"]
            <= entry["kept_ratio_stage1"]
            <= 1
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


def test_feature_reduction_sum_distils_the_squared_norm(tmp_path, data, monkeypatch):
    """feature_reduction="sum": the trainer's NPKD feature term is eq. (13)'s squared norm as
    written, C times the channel mean on the same features, and it is what loss_feat logs."""
    import sureid.trainer as trainer_module

    seen = []

    def spy(f_s, f_t, *args, **kwargs):
        out = npkd_loss(f_s, f_t, *args, **kwargs)
        mean = npkd_loss(f_s, f_t, *args, **{**kwargs, "feature_reduction": "mean"})["feat"]
        feat = float(out["feat"].detach())
        seen.append((kwargs["feature_reduction"], feat, float(mean.detach()), f_s.shape[-1]))
        return out

    monkeypatch.setattr(trainer_module, "npkd_loss", spy)
    args = _args(tmp_path, max_steps=1, feature_reduction="sum")
    trainer = SureidTrainer(
        model=_student(), args=args, train_dataset=data["train"], teacher=_teacher()
    )
    trainer.train()
    (entry,) = _train_logs(trainer)
    ((reduction, feat, mean, channels),) = seen
    assert reduction == "sum" and feat == pytest.approx(channels * mean, rel=1e-5)
    assert entry["loss_feat"] == pytest.approx(feat, rel=1e-4) and mean > 0
    with pytest.raises(ValueError, match=r"feature_reduction must be one of \('mean', 'sum'\)"):
        _args(tmp_path, feature_reduction="norm")


def test_lambda_occlusion_teaches_the_predictors_to_drop_the_pasted_occluder(tmp_path, data):
    """lambda_occlusion > 0 (with NODA): loss_occlusion is logged and added to the total, on
    the tokens the NODA collator marked as under its occluder; the keep logits there fall."""
    from sureid.data.noda import build_train_collator

    student = _student()
    cfg = student.config
    collate = build_train_collator(cfg.image_size, noda=True)
    torch.manual_seed(0)
    batch = collate([data["train"][i] for i in range(8)])
    flags = SureidTrainer._occluded_tokens(batch, cfg)
    assert flags.shape == (16, cfg.num_patches) and flags[8:].any() and not flags[:8].any()

    def stage1_logits():  # eval mode: no drop path, so only the weights move them
        student.eval()
        with torch.no_grad():
            out = student(pixel_values=batch["pixel_values"], hts_decisions="topk")
        logits = out.keep_logits[0]
        return logits[flags].mean(), logits[~flags].mean()

    before, before_rest = stage1_logits()
    args = _args(
        tmp_path,
        max_steps=10,
        lambda_occlusion=5.0,
        optim="adamw_torch",
        optim_args=None,
        learning_rate=1e-2,
    )
    trainer = SureidTrainer(model=student, args=args, train_dataset=data["train"])
    trainer.train()
    for entry in _train_logs(trainer):
        total = entry["loss_cls"] + entry["loss_tri"] + 2.0 * entry["loss_ratio"]
        total += 5.0 * entry["loss_occlusion"]
        assert entry["loss_total"] == pytest.approx(total, rel=1e-4)
    after, after_rest = stage1_logits()
    # the occluder's tokens fall, and by more than the others (the pull reaches every token
    # through the predictor's shared weights, but the occluder's most). CPU training is not
    # bit-reproducible: over 20 runs the gap was 0.03 to 0.15, so no margin is asked of it
    fall, fall_rest = float(before - after), float(before_rest - after_rest)
    assert fall > 0.2 and fall > fall_rest, (fall, fall_rest)
    with pytest.raises(ValueError, match="lambda_occlusion must be >= 0"):
        _args(tmp_path, lambda_occlusion=-1.0)
    with pytest.raises(ValueError, match="learns from the occluders NODA pastes"):
        _args(tmp_path, lambda_occlusion=1.0, noda=False)
    with pytest.raises(SureidError, match="only the NODA collator writes"):
        SureidTrainer._occluded_tokens({"pixel_values": batch["pixel_values"]}, cfg)


def test_the_papers_recipe_without_teacher_adds_the_ratio_loss(tmp_path, data):
    """hts_sampling="gumbel" and token_guidance="none": the paper's "+HTS" row."""
    trainer = SureidTrainer(
        model=_student(hts_sampling="gumbel"),
        args=_args(tmp_path, max_steps=1, token_guidance="none"),
        train_dataset=data["train"],
    )
    assert trainer.guide is None
    trainer.train()
    (entry,) = _train_logs(trainer)
    assert "loss_kd" not in entry and "loss_token" not in entry
    total = entry["loss_cls"] + entry["loss_tri"] + 2.0 * entry["loss_ratio"]
    assert entry["loss_total"] == pytest.approx(total, rel=1e-4)
    assert entry["loss_ratio"] > 0  # per-token sampling misses the targets


def test_ratio_on_probabilities_replaces_the_sampled_share(tmp_path, data, monkeypatch):
    """ratio_on="probabilities": the trainer calls the expected-share loss with the model's keep
    probabilities and masks, logs it as loss_ratio, and adds it as the paper's term."""
    import sureid.trainer as trainer_module

    calls = []

    def spy(probs, masks, targets):
        calls.append((len(probs), len(masks), targets))
        return expected_ratio_loss(probs, masks, targets)

    monkeypatch.setattr(trainer_module, "expected_ratio_loss", spy)
    monkeypatch.setattr(trainer_module, "ratio_loss", None)  # the paper's loss must not run
    student = _student(hts_sampling="gumbel")
    trainer = SureidTrainer(
        model=student,
        args=_args(tmp_path, max_steps=1, token_guidance="none", ratio_on="probabilities"),
        train_dataset=data["train"],
    )
    trainer.train()
    (entry,) = _train_logs(trainer)
    cfg = student.config
    assert calls == [(3, 3, [k / cfg.num_patches for k in cfg.stage_keep_counts])]
    assert entry["loss_total"] == pytest.approx(
        entry["loss_cls"] + entry["loss_tri"] + 2.0 * entry["loss_ratio"], rel=1e-4
    )
    with pytest.raises(
        ValueError, match=r"ratio_on must be one of \('decisions', 'probabilities'\)"
    ):
        _args(tmp_path, ratio_on="expected")


def test_without_teacher_the_guide_is_the_student_as_it_started(tmp_path, data):
    """Token guidance with no teacher: a frozen copy of the initial student supplies the
    rollout; training changes the student, never the guide."""
    student = _student()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = SureidTrainer(
        model=student,
        args=_args(tmp_path, max_steps=2, lambda_token=0.5, token_guidance="cls-attention"),
        train_dataset=data["train"],
    )
    assert trainer.guide is not None and trainer.guide is not student
    assert all(not p.requires_grad for p in trainer.guide.parameters())
    trainer.train()
    for entry in _train_logs(trainer):
        total = entry["loss_cls"] + entry["loss_tri"] + 2.0 * entry["loss_ratio"]
        assert entry["loss_total"] == pytest.approx(total + 0.5 * entry["loss_token"], rel=1e-4)
    for name, value in trainer.guide.state_dict().items():
        assert torch.equal(value, start[name]), name
    assert not torch.equal(
        student.state_dict()["predictors.0.out_conv.4.weight"],
        start["predictors.0.out_conv.4.weight"],
    )


def test_predictor_learning_rate_and_backbone_freeze(tmp_path, data):
    """The predictors get their own learning rate; during the freeze only they move."""
    student = _student()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    args = _args(tmp_path, max_steps=2, predictor_learning_rate=0.01, freeze_backbone_steps=2)
    trainer = SureidTrainer(model=student, args=args, train_dataset=data["train"])
    trainer.create_optimizer()
    predictor_ids = {id(p) for p in student.predictors.parameters()}
    groups = trainer.optimizer.param_groups
    for group in groups:
        ids = {id(p) for p in group["params"]}
        assert not ids or ids <= predictor_ids or not ids & predictor_ids  # never mixed
        if ids and ids <= predictor_ids:
            assert group["lr"] == 0.01
        elif ids:
            assert group["lr"] == args.learning_rate
    assert predictor_ids == {id(p) for g in groups for p in g["params"] if id(p) in predictor_ids}
    trainer.train()
    for name, value in student.state_dict().items():
        moved = not torch.equal(value, start[name])
        if name.startswith("predictors.") and ".out_conv." in name and name.endswith("weight"):
            assert moved, name
        elif (
            not name.startswith("predictors.")
            and "running" not in name
            and "num_batches" not in name
        ):
            assert not moved, name  # frozen (BN running statistics still track the batches)


def test_topk_sampling_fits_the_model_to_what_the_predictors_keep(tmp_path, data):
    """hts_sampling="topk": training runs the inference decisions (exactly k per stage, the
    top-k of the keep score), the mask carries no gradient, so the predictors stay as they are
    (weight decay included) while the rest of the model learns."""
    student = _student(hts_sampling="topk")
    start = {k: v.clone() for k, v in student.state_dict().items()}
    pixels = torch.randn(4, 3, *student.config.image_size)
    student.train()
    out = student(pixels)
    for mask, k in zip(out.keep_masks, student.config.stage_keep_counts):
        assert torch.equal(mask.sum(1), torch.full((4,), float(k)))
    assert torch.equal(out.keep_masks[-1], student(pixels, hts_decisions="topk").keep_masks[-1])
    trainer = SureidTrainer(
        model=student, args=_args(tmp_path, max_steps=2), train_dataset=data["train"]
    )
    trainer.train()
    moved = {n for n, v in student.state_dict().items() if not torch.equal(v, start[n])}
    assert not {n for n in moved if n.startswith("predictors.")}
    assert "encoder.blocks.0.attn.qkv.weight" in moved
    assert all(float(e["loss_ratio"]) < 1e-3 for e in _train_logs(trainer))


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


def test_mismatched_identities_are_refused(tmp_path, data):
    teacher = SureidTeacherModel(SureidTeacherConfig(**TINY, num_identities=NUM_IDS + 1))
    with pytest.raises(SureidError, match="num_identities"):
        SureidTrainer(
            model=_student(), args=_args(tmp_path), train_dataset=data["train"], teacher=teacher
        )


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
    with pytest.raises(SureidError, match=r"loss term 'cls' is nan at step 0"):
        trainer.train()
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_evaluate_reports_what_evaluate_model_reports(tmp_path, data):
    """SureidTrainer.evaluate and evaluation.evaluate_model on the same checkpoint agree."""
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
    # an HTS student also gets the predictor check: random keeping and, the synthetic set
    # having visible-body and occluder masks, the body and occluder measures; no teacher and
    # no token guidance (the default) leave it without a guide, hence no oracle and no Spearman
    check = {"random_R1", "random_mAP", "random_R1_min", "random_R1_max"}
    check |= {"body_share", "body_chance", "body_auc"}
    check |= {f"body_share_stage{j}" for j in (1, 2, 3)}
    check |= {"occluder_share", "occluder_chance", "sampling_overlap", "sampling_overlap_chance"}
    check |= {
        f"{name}_{m}" for name in ("stage1_ranking", "occluder_dropped") for m in ("R1", "mAP")
    }
    assert {k for k in got if k.startswith("eval_")} == {
        "eval_R1",
        "eval_R5",
        "eval_mAP",
        "eval_mINP",
    } | {f"eval_{name}" for name in check}
    assert got["eval_R1"] == pytest.approx(expected.rank(1), abs=1e-6)
    assert got["eval_R5"] == pytest.approx(expected.rank(5), abs=1e-6)
    assert got["eval_mAP"] == pytest.approx(expected.mAP, abs=1e-6)
    assert got["eval_mINP"] == pytest.approx(expected.mINP, abs=1e-6)
    assert 0.0 < expected.mAP < 1.0  # random weights: neither a perfect nor an empty ranking


def test_eval_every_epochs_asks_only_at_multiples_of_n():
    callback = EvaluateEveryEpochs(2)
    asked = []
    for epoch in (1.0, 2.0, 3.0, 4.0, 4.5, 6.0):
        control = TrainerControl()
        callback.on_epoch_end(None, TrainerState(epoch=epoch), control)
        asked.append(control.should_evaluate)
    assert asked == [False, True, False, True, False, True]
    with pytest.raises(SureidError, match="must be >= 1"):
        EvaluateEveryEpochs(-1)


def test_train_main_evaluates_every_nth_epoch(tmp_path, monkeypatch, tiny_synthetic_root):
    """--eval-every-epochs 2 over 3 epochs: one evaluation after epoch 2, then the final one
    (evaluating every epoch, as before, gave 1, 2, 3 and the final one)."""
    seen = []
    evaluate = SureidTrainer.evaluate

    def recording(self, *args, **kwargs):
        seen.append(self.state.epoch)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(SureidTrainer, "evaluate", recording)
    argv = ["--dataset", "synthetic", "--data-root", str(tiny_synthetic_root), "--from-scratch"]
    argv += ["--output-dir", str(tmp_path / "out"), "--image-size", "64", "32"]
    argv += ["--patch-size", "8", "--hidden-size", "32", "--depth", "2", "--heads", "2"]
    argv += ["--epochs", "3", "--batch-size", "4", "--num-instances", "2", "--workers", "0"]
    argv += ["--eval-every-epochs", "2"]
    metrics = train_main(argv, "teacher")
    assert seen == [2.0, 3.0]  # epoch 2 by the callback, then train_main's own at the end
    assert {"eval_R1", "eval_mAP", "eval_mINP"} <= metrics.keys()


def test_train_main_refuses_topk_sampling_with_new_predictors(tmp_path, tiny_synthetic_root):
    """--hts-sampling topk does not train the predictors: from scratch (new ones) it is refused
    before any training; from an HTS checkpoint its trained predictors are kept and it runs."""
    argv = ["--dataset", "synthetic", "--data-root", str(tiny_synthetic_root)]
    argv += ["--image-size", "64", "32", "--epochs", "1", "--batch-size", "4"]
    argv += ["--num-instances", "2", "--workers", "0", "--hts-sampling", "topk"]
    scratch = ["--from-scratch", "--patch-size", "8", "--hidden-size", "64", "--depth", "6"]
    scratch += ["--heads", "4", "--sparsify-layers", "1", "3", "5"]  # _student's shape
    with pytest.raises(SureidError, match="new: \\['predictors.0"):
        train_main([*argv, *scratch, "--output-dir", str(tmp_path / "scratch")], "student")
    assert not (tmp_path / "scratch" / "config.json").exists()
    student = _student()
    student.save_pretrained(tmp_path / "hts")
    before = {k: v.clone() for k, v in student.state_dict().items() if k.startswith("predictors.")}
    out = tmp_path / "tuned"
    train_main([*argv, "--init-from", str(tmp_path / "hts"), "--output-dir", str(out)], "student")
    tuned = SureidStudentModel.from_pretrained(out)
    assert tuned.config.hts_sampling == "topk"
    for name, value in before.items():
        assert torch.equal(tuned.state_dict()[name], value), name


def test_every_sureid_training_field_has_an_args_line_with_its_default():
    doc = SureidTrainingArguments.__doc__
    fields = {f.name: f for f in dataclasses.fields(SureidTrainingArguments)}
    for name in SureidTrainingArguments.__annotations__:  # the fields this class sets
        line = re.search(rf"^\s+{name} \(`.+`, \*optional\*, defaults to `(.+)`\):$", doc, re.M)
        assert line, f"no Args line for {name}"
        assert ast.literal_eval(line.group(1)) == fields[name].default, name
    assert "Example:" in doc and ">>> " in doc


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
    # the case: a NaN learning rate from the first step
    args = _args(tmp_path / "b", max_steps=2, save_strategy="steps", save_steps=1)
    args.learning_rate = float("nan")
    trainer = SureidTrainer(model=_student(), args=args, train_dataset=data["train"])
    with pytest.raises(SureidError, match="at step 1 .*no checkpoint was written"):
        trainer.train()
    assert not list((tmp_path / "b" / "run").glob("*checkpoint-*"))


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
    from sureid.trainer import checkpoint_problem, latest_checkpoint

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


def test_init_from_builds_the_student_from_any_checkpoint(tmp_path):
    """--init-from: the checkpoint's architecture and weights, a new classifier for other
    identities, the HTS options from the command line; a wrong --image-size is refused."""
    from sureid.trainer import (
        _build_model,
        _load_init_from,
        _training_arguments,
        build_training_parser,
    )

    source = _teacher(seed=3)  # a dense checkpoint of NUM_IDS identities
    source.save_pretrained(tmp_path / "dense")
    argv = ["--dataset", "synthetic", "--data-root", "x", "--output-dir", "y"]
    argv += ["--init-from", str(tmp_path / "dense"), "--keep-rate", "0.5"]
    argv += ["--sparsify-layers", "1", "3", "5", "--hts-sampling", "gumbel"]
    a = build_training_parser("student").parse_args(argv)
    assert a.ratio_on == "decisions"  # the paper's eq. (9) unless asked
    assert _training_arguments(a, "student").feature_reduction == "mean"
    b = build_training_parser("student").parse_args(
        [*argv, "--ratio-on", "probabilities", "--feature-reduction", "sum"]
    )
    assert _training_arguments(b, "student").ratio_on == "probabilities"
    assert _training_arguments(b, "student").feature_reduction == "sum"
    assert _training_arguments(a, "student").lambda_occlusion == 0.0  # the paper's recipe
    c = build_training_parser("student").parse_args([*argv, "--lambda-occlusion", "0.5"])
    assert _training_arguments(c, "student").lambda_occlusion == 0.5
    loaded = _load_init_from(a.init_from, a.image_size)
    model = _build_model(a, "student", NUM_IDS + 2, loaded)
    assert isinstance(model, SureidStudentModel)
    assert model.config.keep_rate == 0.5 and model.config.hts_sampling == "gumbel"
    assert model.config.hidden_size == TINY["hidden_size"] and model.config.image_size == [64, 32]
    theirs = source.state_dict()
    for name, value in model.state_dict().items():
        if name.startswith("encoder."):
            assert torch.equal(value, theirs[name]), name
    assert model.head.classifier.weight.shape[0] == NUM_IDS + 2  # new: other identities
    with pytest.raises(SureidError, match=r"trained at image size 64x32, not 256x128"):
        _load_init_from(str(tmp_path / "dense"), (256, 128))
    with pytest.raises(SureidError, match=r"--init-from .*missing"):
        _load_init_from(str(tmp_path / "missing"), None)
