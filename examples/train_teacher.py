"""Train the dense ViT teacher (CE + triplet, NODA) on a ReID data set.

    accelerate launch examples/train_teacher.py --dataset occluded_duke --data-root DIR \
        --output-dir runs/teacher-occduke
    python examples/train_teacher.py --dataset synthetic --data-root data/synthetic \
        --output-dir runs/teacher-syn --from-scratch --hidden-size 192 --depth 8 --heads 3 \
        --image-size 128 64 --patch-size 8 --epochs 10 --batch-size 32 --lr 0.03 --dataloader-num-workers 0

Options: `python examples/train_teacher.py --help`; recipes: docs/training.md.
"""

import sys

from sureid.cli.train import build_training_parser, train_main


def build_parser():
    """This script's options (what ``--help`` lists); tests/test_zoo.py parses the zoo's
    recipes with it."""
    return build_training_parser("teacher")


if __name__ == "__main__":
    train_main(sys.argv[1:], role="teacher")
