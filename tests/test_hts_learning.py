"""The unit test of "HTS learns": on a task whose label lives in known patches, the student's
training teaches its predictors to keep those patches.

The toy task: 32x32 images, 8x8 patches (a 4x4 grid), 8 classes. Three fixed patches carry one
bit of the class each (one of two colours per patch); every other patch is a random colour, and
all of it is noisy. A dense teacher learns the task; an HTS student (keep 0.7: 11, 8 and 5 of 16
tokens after its three stages) is then distilled from it with the guided recipe (NPKD, token
guidance from the teacher's class attention turned on with ``lambda_token=1.0``, Gumbel-top-k
decisions). At the last stage its predictors must keep at least 90% of the informative patches
(random keeping: 5/16 = 31%). When this test was written the guided recipe kept 100% of them;
the paper's recipe (per-token Gumbel decisions with the ratio loss, no guidance; the library's
default, ``lambda_token=0.0``, which the demo measured best) kept 16% here, below chance: three
informative patches out of sixteen are too small a signal for the task losses alone in this
budget. The code before the fix (predictors starting at keep probability 0.5, no guidance) kept
43%.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from sureid import (
    SureidStudentConfig,
    SureidStudentModel,
    SureidTeacherConfig,
    SureidTeacherModel,
)
from sureid.analysis import token_importance
from sureid.trainer import SureidTrainer, SureidTrainingArguments

# Slow: the teacher trains in the module fixture (~10 s), the student in its test (~20 s).
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

INFORMATIVE = (5, 10, 12)  # grid cells (row-major) that carry the class
GRID, PATCH, CLASSES = 4, 8, 8
TOY = dict(
    image_size=(32, 32),
    patch_size=PATCH,
    stride_size=PATCH,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    drop_path_rate=0.0,
    num_identities=CLASSES,
)
STEPS = 300


def toy_task(per_class: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 3, 32, 32] and labels [N]: patch j of INFORMATIVE shows bit j of the label."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.rand(len(INFORMATIVE), 2, 3, generator=g) * 2 - 1
    images, labels = [], []
    for label in range(CLASSES):
        for _ in range(per_class):
            colours = torch.rand(GRID * GRID, 3, generator=g) * 2 - 1
            for j, cell in enumerate(INFORMATIVE):
                colours[cell] = palette[j, (label >> j) & 1]
            patches = colours[:, :, None, None].expand(-1, -1, PATCH, PATCH)
            patches = patches + 0.2 * torch.randn(GRID * GRID, 3, PATCH, PATCH, generator=g)
            image = patches.reshape(GRID, GRID, 3, PATCH, PATCH).permute(2, 0, 3, 1, 4)
            images.append(image.reshape(3, GRID * PATCH, GRID * PATCH))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def train(model, images, labels, tmp_path, teacher=None, **overrides) -> None:
    """``SureidTrainer``'s training on the toy task (no augmentation: the pixels as they are)."""
    data = Dataset.from_dict(
        {"pid": labels.tolist(), "camid": [0] * len(labels), "index": list(range(len(labels)))}
    )

    def collate(samples):
        rows = [s["index"] for s in samples]
        return {"pixel_values": images[rows], "labels": labels[rows]}

    args = SureidTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=32,
        num_instances=4,
        optim="adamw_torch",
        optim_args=None,
        learning_rate=1e-3,
        weight_decay=0.05,
        warmup_steps=0.05,
        noda=False,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        **overrides,
    )
    SureidTrainer(
        model=model, args=args, train_dataset=data, teacher=teacher, train_collator=collate
    ).train()


def informative_share(kept: torch.Tensor) -> float:
    """Share of (image, informative patch) pairs among the kept grid indices [N, k]."""
    hits = sum((kept == cell).any(dim=1).float() for cell in INFORMATIVE)
    return float(hits.mean()) / len(INFORMATIVE)


@pytest.fixture(scope="module")
def task():
    return toy_task()


@pytest.fixture(scope="module")
def teacher(task, tmp_path_factory):
    images, labels = task
    torch.manual_seed(0)
    model = SureidTeacherModel(SureidTeacherConfig(**TOY))
    train(model, images, labels, tmp_path_factory.mktemp("teacher"))
    return model.eval()


@pytest.mark.parametrize("method", ["cls-attention", "rollout"])
def test_the_teacher_solves_the_task_and_attends_to_the_informative_patches(task, teacher, method):
    images, labels = task
    with torch.no_grad():
        accuracy = (teacher(images).logits.argmax(1) == labels).float().mean()
    assert accuracy > 0.95
    # the teacher's importance ranks them top: "cls-attention" is what token guidance teaches
    # the student's predictors (lambda_token > 0), "rollout" the check's default guide
    top = token_importance(teacher, images, method).topk(5, dim=1).indices
    assert informative_share(top) > 0.85


def test_hts_keeps_the_informative_patches(task, teacher, tmp_path):
    images, labels = task
    torch.manual_seed(1)
    student = SureidStudentModel(
        SureidStudentConfig(
            **TOY, sparsify_layers=(1, 2, 3), keep_rate=0.7, hts_sampling="gumbel-topk"
        )
    )
    assert student.config.stage_keep_counts == [11, 8, 5]
    # the one guidance option: lambda_token > 0 (off by default) teaches each stage's predictor
    # the top-k of the teacher's class-token attention
    train(student, images, labels, tmp_path, teacher=teacher, lambda_token=1.0)
    student.eval()
    with torch.no_grad():
        out = student(images)  # true token dropping, top-k of the keep scores
    shares = [informative_share(kept) for kept in out.kept_indices]
    assert shares[-1] >= 0.9, shares
    assert (out.logits.argmax(1) == labels).float().mean() > 0.9
