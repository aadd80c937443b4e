"""``from_pretrained("org/name")`` through a Hugging Face cache laid out as the hub lays it out, offline."""

from __future__ import annotations

import os

import pytest

from sureid import SureidStudentConfig, SureidStudentModel

from .conftest import TINY

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _make_hub_cache(hf_home, repo_id: str) -> SureidStudentModel:
    """Write HF_HOME/hub/models--org--name/{blobs,refs/main,snapshots/<rev>/...} like the hub."""
    model = SureidStudentModel(
        SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), num_identities=4)
    )
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    staging = hf_home / "staging"
    model.save_pretrained(staging)
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(staging.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        file.rename(blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return model


@pytest.mark.slow
def test_from_pretrained_resolves_through_the_offline_hub_cache(tmp_path, run_offline_python):
    hf_home = tmp_path / "hf"
    model = _make_hub_cache(hf_home, "org/sureid-tiny")
    expected = model.eval()(__import__("torch").zeros(1, 3, 64, 32)).features[0, :4].tolist()
    script = (
        "import json, torch, sureid\n"
        "from transformers import AutoImageProcessor, AutoModel\n"
        "m = sureid.SureidModel.from_pretrained('org/sureid-tiny').eval()\n"
        "a = AutoModel.from_pretrained('org/sureid-tiny')\n"
        "p = AutoImageProcessor.from_pretrained('org/sureid-tiny')\n"
        "f = m(torch.zeros(1, 3, 64, 32)).features[0, :4].tolist()\n"
        "print(json.dumps([type(m).__name__, type(a).__name__, type(p).__name__, f]))\n"
    )
    names_and_features = run_offline_python(script, hf_home)
    assert names_and_features[:3] == [
        "SureidStudentModel",
        "SureidStudentModel",
        "SureidImageProcessor",
    ]
    # Same weights; another process may sum in another order (thread count), so not bit-equal.
    assert names_and_features[3] == pytest.approx(expected, abs=1e-5)

    # A repo that is not in the cache fails offline with the repo's name in the message.
    script = "import sureid; sureid.SureidModel.from_pretrained('org/not-cached')"
    done = run_offline_python(script, hf_home, check=False)
    assert done.returncode != 0 and "org/not-cached" in done.stderr


def test_from_pretrained_reads_a_hub_cache_in_process(tmp_path):
    """The same cache layout read in this process (cache_dir, local files only): the weights,
    the auto classes and the image processor come back."""
    import torch
    from transformers import AutoImageProcessor, AutoModel

    from sureid import SureidImageProcessor, SureidModel

    model = _make_hub_cache(tmp_path / "hf", "org/sureid-tiny").eval()
    cache = tmp_path / "hf" / "hub"
    loaded = SureidModel.from_pretrained("org/sureid-tiny", cache_dir=cache, local_files_only=True)
    assert isinstance(loaded, SureidStudentModel) and loaded.config.num_identities == 4
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    auto = AutoModel.from_pretrained("org/sureid-tiny", cache_dir=cache, local_files_only=True)
    assert isinstance(auto, SureidStudentModel)
    processor = AutoImageProcessor.from_pretrained(
        "org/sureid-tiny", cache_dir=cache, local_files_only=True
    )
    assert isinstance(processor, SureidImageProcessor)
    with pytest.raises(OSError, match="org/not-cached"):
        SureidModel.from_pretrained("org/not-cached", cache_dir=cache, local_files_only=True)
