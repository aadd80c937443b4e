"""The ReID data layer: data sets, identity sampler, transforms, NODA, the built-in synthetic set.

Data flows one way: this package imports nothing from the models, trainer or inference code;
from outside ``sureid.data`` it reads only ``configuration_sureid`` (the ImageNet mean and std).
"""

from .datasets import DATASET_NAMES, load_reid_dataset, summary
from .noda import (
    OCCLUDER_KINDS,
    NodaCollator,
    NodaPaste,
    OccluderBank,
    Placement,
    ReidCollator,
    build_eval_collator,
    build_train_collator,
    draw_occluder,
    occluder_placement,
)
from .sampler import IdentitySampler
from .synthetic import make_synthetic_reid
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomPatch,
    build_eval_transform,
    build_train_transform,
)

__all__ = [
    "DATASET_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OCCLUDER_KINDS",
    "IdentitySampler",
    "NodaCollator",
    "NodaPaste",
    "OccluderBank",
    "Placement",
    "RandomPatch",
    "ReidCollator",
    "build_eval_collator",
    "build_eval_transform",
    "build_train_collator",
    "build_train_transform",
    "draw_occluder",
    "load_reid_dataset",
    "make_synthetic_reid",
    "occluder_placement",
    "summary",
]
