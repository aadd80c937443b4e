"""Model cards: the card a tiny training run writes parses back with its metrics; the trainer
never puts another step's metrics on the saved weights; save_pretrained keeps an existing card."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard

from sureid import (
    SureidError,
    SureidStudentModel,
    SureidTeacherConfig,
    SureidTeacherModel,
)
from sureid.cli.train import _card_info, parse_training_arguments, train_main
from sureid.data.datasets import load_reid_dataset
from sureid.model_card import (
    TAGS,
    build_model_card,
    card_metrics,
    hub_base_model,
    timm_hub_id,
    write_model_card,
)
from sureid.trainer import SureidTrainer, SureidTrainingArguments

from .conftest import TINY

SMALL = dict(
    image_size=(64, 32),
    patch_size=8,
    stride_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
)


@pytest.fixture
def synthetic(tiny_synthetic_root):
    return tiny_synthetic_root


def _results(card: ModelCard) -> dict:
    return {r.metric_name: r for r in card.data.eval_results or []}


def test_a_tiny_training_run_writes_a_card_that_parses_back(tmp_path, synthetic, one_thread):
    teacher_dir = tmp_path / "teacher"
    SureidTeacherModel(SureidTeacherConfig(**SMALL, num_identities=4)).save_pretrained(teacher_dir)
    out = tmp_path / "student"
    argv = ["--dataset", "synthetic", "--data-root", str(synthetic), "--from-scratch"]
    argv += ["--output-dir", str(out), "--image-size", "64", "32", "--patch-size", "8"]
    argv += ["--hidden-size", "32", "--depth", "2", "--heads", "2", "--sparsify-layers", "1"]
    argv += ["--max-steps", "2", "--batch-size", "4", "--num-instances", "2"]
    argv += ["--dataloader-num-workers", "0", "--report-to", "none"]
    argv += ["--teacher", str(teacher_dir)]
    metrics = train_main(argv, "student")

    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "sureid" and data.license == "apache-2.0"
    assert set(TAGS) <= set(data.tags) and data.pipeline_tag == "image-feature-extraction"
    assert data.datasets == ["synthetic"]
    assert data.base_model is None  # from scratch: no Hub model to name
    results = _results(card)
    assert sorted(results) == ["R1", "mAP", "mINP"]
    for name in ("R1", "mAP", "mINP"):
        assert results[name].metric_value == round(100 * metrics[f"eval_{name}"], 2)
        assert results[name].metric_config == "market"
        assert results[name].dataset_type == "synthetic"
    text = card.text
    assert "32 -> 22 (before block 2)" in text  # 8x4 tokens, keep 0.7
    assert str(teacher_dir) in text and "SureidTeacherModel" in text
    assert "sureid train student --dataset synthetic" in text
    assert "| lambda_kl | 0.1 |" in text and "| steps_trained | 2 |" in text
    assert "| optim | sgd |" in text and "| lr_scheduler_type | cosine |" in text
    assert f'SureidModel.from_pretrained("{out}")' in text
    assert "## Limits" in text and "Not measured for these weights" in text


def test_the_card_has_metrics_only_of_the_weights_it_describes(tmp_path, synthetic, one_thread):
    data = load_reid_dataset("synthetic", synthetic)
    torch.manual_seed(0)
    model = SureidTeacherModel(SureidTeacherConfig(**SMALL, num_identities=4))
    args = SureidTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=4,
        num_instances=2,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
    )
    trainer = SureidTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset={"query": data["query"], "gallery": data["gallery"]},
    )
    trainer.model_card_info = {"dataset": "synthetic"}
    trainer.evaluate()  # step 0: not the weights that will be saved
    trainer.train()
    trainer.save_model()
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.eval_results is None and "No evaluation of these weights" in card.text
    assert "| steps_trained | 1 |" in card.text and "lambda_kl" not in card.text  # no teacher

    metrics = trainer.evaluate()
    card = ModelCard.load(trainer.write_model_card())
    assert _results(card)["mAP"].metric_value == round(100 * metrics["eval_mAP"], 2)
    assert "Teacher: none" in card.text


def test_save_pretrained_writes_a_card_without_metrics_and_keeps_an_existing_one(
    tmp_path, tiny_student_config
):
    model = SureidStudentModel(tiny_student_config)
    model.save_pretrained(tmp_path / "a")
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert card.data.library_name == "sureid" and card.data.eval_results is None
    assert "32 -> 22 (before block 2) -> 16 (before block 4) -> 11 (before block 6)" in card.text

    mine = tmp_path / "b" / "README.md"
    mine.parent.mkdir()
    mine.write_text("# my own card\n")
    model.save_pretrained(tmp_path / "b")
    assert mine.read_text() == "# my own card\n"

    card = build_model_card(model, dataset="occluded_duke", metrics={"R1": 0.612, "mAP": 0.5})
    write_model_card(tmp_path / "a", card)
    model.save_pretrained(tmp_path / "a")  # a later save keeps the card, metrics and all
    results = _results(ModelCard.load(tmp_path / "a" / "README.md"))
    assert results["R1"].metric_value == 61.2 and results["mAP"].metric_value == 50.0
    assert results["R1"].dataset_name == "Occluded-Duke"


def test_metadata_names_the_protocol_the_base_model_and_refuses_percentages():
    config = SureidTeacherConfig(**TINY)
    card = build_model_card(
        config,
        dataset="market1501",
        test_dataset="Occluded-REID",
        metrics={"eval_R1": 0.25, "eval_mAP": None, "eval_mINP": float("nan")},
        base_model=timm_hub_id("vit_base_patch16_224"),
    )
    assert card.data.base_model == "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert card.data.datasets == ["market1501", "occluded_reid"]
    (r1,) = card.data.eval_results  # None and NaN are left out, never written as numbers
    assert (r1.metric_value, r1.metric_config, r1.dataset_type) == (25.0, "cross", "occluded_reid")
    assert "camera-constrained" in card.text  # a teacher's limit
    with pytest.raises(SureidError, match="R1 = 61.2 is not a fraction"):
        card_metrics({"R1": 61.2})
    with pytest.raises(SureidError, match="test_dataset"):
        build_model_card(config, metrics={"R1": 0.5})
    assert timm_hub_id("no_such_model") is None


def test_base_model_of_a_training_run(tmp_path):
    def info(*extra):
        argv = ["--dataset", "Occluded-Duke", "--data-root", "d", "--output-dir", "o", *extra]
        a, _ = parse_training_arguments(argv, "student")
        return _card_info(a, "student", "occluded_duke", ["--dataset", "Occluded-Duke"])

    got = info()
    assert got["base_model"] == "timm/deit_small_distilled_patch16_224.fb_in1k"
    assert got["dataset"] == "occluded_duke" and got["test_dataset"] == "occluded_duke"
    assert got["command"] == "sureid train student --dataset Occluded-Duke"
    assert got["started_from"] == "timm's deit_small_distilled_patch16_224 ImageNet weights"
    assert info("--from-scratch")["base_model"] is None
    assert info("--imagenet-checkpoint", "w.pth")["base_model"] is None
    assert info("--init-from", "org/sureid-dense")["base_model"] == "org/sureid-dense"
    assert info("--init-from", str(tmp_path))["base_model"] is None  # a local folder
    assert hub_base_model("sureid-deit-occduke") is None  # a recipe: nothing published
