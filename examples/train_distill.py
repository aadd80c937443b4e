"""Distil an HTS student from a frozen teacher with NPKD and NODA (the paper's loss (14)).

    accelerate launch examples/train_distill.py --dataset occluded_duke --data-root DIR \
        --teacher runs/teacher-occduke --output-dir runs/sureid-occduke
    python examples/train_distill.py --dataset synthetic --data-root data/synthetic \
        --teacher runs/teacher-syn --output-dir runs/student-syn --from-scratch \
        --hidden-size 96 --depth 8 --heads 2 --sparsify-layers 2 4 6 --image-size 128 64 \
        --patch-size 8 --epochs 10 --batch-size 32 --lr 0.03 --dataloader-num-workers 0

Fine-tuning from a trained dense student (as DynamicViT starts from a trained DeiT), the
predictors at ten times the backbone's learning rate:

    python examples/train_distill.py --dataset occluded_duke --data-root DIR \
        --teacher runs/teacher-occduke --init-from runs/dense-occduke --epochs 30 \
        --predictor-learning-rate 0.08 --output-dir runs/sureid-occduke-ft

Options: `python examples/train_distill.py --help`; recipes: docs/training.md.
"""

import sys

from sureid.cli.train import build_training_parser, train_main


def build_parser():
    """This script's options (what ``--help`` lists); tests/test_zoo.py parses the zoo's
    recipes with it."""
    return build_training_parser("student")


if __name__ == "__main__":
    train_main(sys.argv[1:], role="student")
