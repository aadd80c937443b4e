"""Shared fixtures: tiny configs (hidden 64, depth 6, 64x32 images) so the suite runs on 2 CPU cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sureid import SureidStudentConfig, SureidStudentModel, SureidTeacherConfig

TINY = dict(
    image_size=(64, 32),
    patch_size=8,
    stride_size=8,
    hidden_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    drop_path_rate=0.0,
)


@pytest.fixture
def tiny_student_config() -> SureidStudentConfig:
    return SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.7, num_identities=10)


@pytest.fixture
def tiny_teacher_config() -> SureidTeacherConfig:
    return SureidTeacherConfig(**TINY, num_identities=10)


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 64, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine they cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def student() -> SureidStudentModel:
    """A tiny HTS student with random weights, in eval mode (true token dropping)."""
    torch.manual_seed(0)
    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.7)
    return SureidStudentModel(config).eval()


@pytest.fixture
def run_offline_python():
    """Run a Python snippet in a fresh interpreter whose Hugging Face home is ``hf_home``, with
    the Hub offline; returns its last line of output parsed as JSON (``check=False``: the
    finished process, whatever its exit code)."""

    def run(script: str, hf_home, check: bool = True):
        env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
        env.pop("HF_HUB_CACHE", None)
        env.pop("TRANSFORMERS_CACHE", None)
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
        if not check:
            return done
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run


@pytest.fixture(scope="session")
def tiny_synthetic_root(tmp_path_factory):
    """A tiny synthetic set on disk (4 train ids, 2 test ids, 64x32), made once per session;
    tests read it, never write into it."""
    from sureid.data.synthetic import make_synthetic_reid

    return make_synthetic_reid(
        tmp_path_factory.mktemp("tiny_synthetic"),
        num_train_ids=4,
        num_test_ids=2,
        size=(64, 32),
        images_per_train_id=2,
        queries_per_id=1,
        gallery_per_id=2,
        num_cameras=2,
    )


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory):
    """A tiny synthetic set (4 test identities, 2 cameras) for the evaluation and check tests."""
    from sureid.data import make_synthetic_reid

    return make_synthetic_reid(
        tmp_path_factory.mktemp("synthetic"), num_train_ids=2, num_test_ids=4, size=(64, 32),
        images_per_train_id=2, queries_per_id=1, gallery_per_id=2, num_cameras=2,
    )  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def _own_sureid_cache(tmp_path_factory):
    """The demo records its output folder in SUREID's cache (for the demo-* zoo ids): tests
    write that record into a folder of their own, never into the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SUREID_CACHE", str(tmp_path_factory.mktemp("sureid-cache")))
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny HTS student saved as a checkpoint folder (seeded), for the command-line tests."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("student")
    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.7)
    SureidStudentModel(config).save_pretrained(path)
    return path
