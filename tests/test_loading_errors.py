"""What a newcomer trips on when a checkpoint does not load (issue 23): a Hub that cannot be
reached or offline mode, config.json fields that are unknown, of the wrong type or of another
library, transformers' load report, and the permissions of the saved files.

No test reaches the network: the Hub's HTTP client is replaced by one that answers "no route
to host" at once, offline mode is patched in, or (the slow test) HF_ENDPOINT points at a
loopback port nothing listens on."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import sys
import time
import warnings

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from transformers import AutoConfig

from sureid import (
    SureidError,
    SureidModel,
    SureidStudentConfig,
    SureidStudentModel,
    SureidTeacherModel,
)

from .conftest import TINY
from .test_hub import _make_hub_cache

# What huggingface_hub did before the fix: five retries, 1 + 2 + 4 + 8 + 8 s of back-off.
NEW_LIMIT_S = 5.0


# -- A. no network ---------------------------------------------------------------------------


@pytest.fixture
def no_route_to_host(monkeypatch):
    """huggingface_hub's HTTP client fails every request at once, as a machine without a route
    to the Hub does; returns the list of requested URLs."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    client_cls = type(huggingface_hub.get_session())
    httpx = sys.modules[client_cls.__module__.split(".")[0]]  # httpx, or the fork the hub uses
    requested = []

    def refuse(request):
        requested.append(str(request.url))
        raise httpx.ConnectError("[Errno 113] No route to host", request=request)

    huggingface_hub.set_client_factory(lambda: client_cls(transport=httpx.MockTransport(refuse)))
    try:
        yield requested
    finally:
        from huggingface_hub.utils._http import default_client_factory

        huggingface_hub.set_client_factory(default_client_factory)


def test_an_uncached_hub_id_fails_at_once_when_the_hub_cannot_be_reached(
    tmp_path, no_route_to_host
):
    """Before: a HEAD request retried five times (about 23 s), then "the Hub has no such repo"."""
    for loader in (SureidModel.from_pretrained, SureidStudentModel.from_pretrained):
        no_route_to_host.clear()
        start = time.perf_counter()
        with pytest.raises(ConnectionError) as err:
            loader("org/not-cached", cache_dir=tmp_path)
        took = time.perf_counter() - start
        assert took < NEW_LIMIT_S, f"{loader.__qualname__}: {took:.1f} s"
        message = str(err.value)
        assert "'org/not-cached'" in message and "could not be reached" in message
        assert constants.ENDPOINT in message and "No route to host" in message
        assert f"the cache ({tmp_path})" in message
        assert "HF_HUB_OFFLINE=1" in message and "local checkpoint folder" in message
        assert "has no such repo" not in message
        tries = [url for url in no_route_to_host if "/resolve/" in url]
        assert len(tries) == 1, no_route_to_host  # one request for the files, no retries
    # A misspelt zoo id is a bare name: the hint to the zoo stays.
    with pytest.raises(ConnectionError, match="Did you mean sureid-deit-occduke"):
        SureidModel.from_pretrained("sureid-deit-occdukee", cache_dir=tmp_path)


def test_a_cached_hub_id_loads_without_the_hub(tmp_path, no_route_to_host):
    """The check before a download is skipped for a repo in the cache, which loads as before."""
    model = _make_hub_cache(tmp_path / "hf", "org/sureid-tiny")
    start = time.perf_counter()
    loaded = SureidModel.from_pretrained("org/sureid-tiny", cache_dir=tmp_path / "hf" / "hub")
    assert time.perf_counter() - start < NEW_LIMIT_S
    assert torch.equal(loaded.encoder.pos_embed, model.encoder.pos_embed)
    assert not any("config.json" in url for url in no_route_to_host)  # no check was made


def test_offline_an_uncached_hub_id_says_offline_and_how_to_work_so(tmp_path, monkeypatch):
    """Before: "the Hugging Face Hub (or its cache, when HF_HUB_OFFLINE=1) has no such repo"."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for loader in (SureidModel.from_pretrained, SureidTeacherModel.from_pretrained):
        with pytest.raises(OSError) as err:
            loader("org/not-cached", cache_dir=tmp_path)
        message = str(err.value)
        assert "offline (HF_HUB_OFFLINE=1)" in message and f"cache ({tmp_path})" in message
        assert "has no such repo" not in message and "local checkpoint folder" in message
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(OSError, match=r"offline \(local_files_only=True\)"):
        SureidModel.from_pretrained("org/not-cached", cache_dir=tmp_path, local_files_only=True)


def _closed_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed when the socket is: nothing listens there


@pytest.mark.slow
def test_an_endpoint_that_does_not_answer_fails_within_seconds(tmp_path, run_offline_python):
    """In a fresh interpreter, HF_ENDPOINT at a loopback port nothing listens on (what a
    machine without a route to the Hub sees): the old code took 23 s, the new one < 5 s. A
    repo in the cache still loads."""
    hf_home = tmp_path / "hf"
    _make_hub_cache(hf_home, "org/sureid-tiny")
    endpoint = f"http://127.0.0.1:{_closed_loopback_port()}"
    script = (
        "import json, os, time\n"
        f"os.environ['HF_ENDPOINT'] = {endpoint!r}\n"
        "os.environ.pop('HF_HUB_OFFLINE', None)\n"
        "import sureid, sureid.modeling_sureid, sureid.zoo\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    sureid.SureidModel.from_pretrained('org/not-a-repo')\n"
        "    error = None\n"
        "except Exception as err:\n"
        "    error = [type(err).__name__, str(err)]\n"
        "took = time.perf_counter() - start\n"
        "start = time.perf_counter()\n"
        "cached = type(sureid.SureidModel.from_pretrained('org/sureid-tiny')).__name__\n"
        "print(json.dumps([took, error, cached, time.perf_counter() - start]))\n"
    )
    done = run_offline_python(script, hf_home, check=False)  # HF_HUB_OFFLINE is unset inside
    assert done.returncode == 0, done.stderr[-3000:]
    took, error, cached, cached_took = json.loads(done.stdout.strip().splitlines()[-1])
    assert took < NEW_LIMIT_S, f"{took:.1f} s"
    assert error[0] == "ConnectionError" and endpoint in error[1]
    assert "could not be reached" in error[1] and "Connection refused" in error[1]
    assert cached == "SureidStudentModel" and cached_took < NEW_LIMIT_S


# -- B. config.json edge cases ------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path, tiny_student_config):
    folder = tmp_path / "ckpt"
    SureidStudentModel(tiny_student_config).save_pretrained(folder)
    return folder


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_an_unknown_config_field_warns_naming_it_the_file_and_the_closest(checkpoint):
    """Before: "keep_rte" was ignored in silence, so keep_rate kept its default."""
    _edit_config(checkpoint, keep_rte=0.5)
    where = str(checkpoint / "config.json")
    for load in (SureidModel.from_pretrained, SureidStudentModel.from_pretrained):
        with pytest.warns(UserWarning, match="unknown config field 'keep_rte'") as caught:
            load(checkpoint)
        (message,) = {str(w.message) for w in caught if "keep_rte" in str(w.message)}
        assert message.startswith(f"{where}: ") and "did you mean 'keep_rate'?" in message
    with pytest.warns(UserWarning, match=f"{where}: unknown config field 'keep_rte'"):
        AutoConfig.from_pretrained(checkpoint)
    with pytest.warns(UserWarning, match="SureidStudentConfig: unknown config field 'gumbel_ta'"):
        SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), gumbel_ta=2.0)


def test_transformers_and_sureid_fields_do_not_warn(checkpoint):
    """What transformers writes or reads in a config.json, and every field SUREID saves."""
    _edit_config(
        checkpoint,
        torch_dtype="float32",
        id2label={"0": "a"},
        label2id={"a": 0},
        output_hidden_states=False,
        return_dict=True,
        problem_type=None,
        chunk_size_feed_forward=0,
        tie_word_embeddings=False,
        use_cache=False,
        _name_or_path="org/x",
        _commit_hash="0" * 40,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SureidModel.from_pretrained(checkpoint)
        AutoConfig.from_pretrained(checkpoint)
        SureidStudentConfig.from_pretrained(checkpoint)


@pytest.mark.parametrize(
    ("field", "value"),
    [("keep_rate", "high"), ("hidden_size", "wide"), ("qkv_bias", "false"), ("image_mean", 0.5)],
)
def test_a_value_of_the_wrong_type_names_the_field_the_value_and_the_file(checkpoint, field, value):
    """Before: "could not convert string to float: 'high'" (no field, no file); a string for a
    flag ("false") was read as True."""
    _edit_config(checkpoint, **{field: value})
    where = str(checkpoint / "config.json")
    for load in (SureidModel.from_pretrained, SureidStudentModel.from_pretrained):
        with pytest.raises(SureidError) as err:
            load(checkpoint)
        message = str(err.value)
        assert message.startswith(f"{where}: {field}") and repr(value) in message, message
    with pytest.raises(ValueError, match=f"^{field}.*{value!r}"):
        SureidStudentConfig(**{**TINY, field: value})


def test_a_model_type_that_is_not_sureids_says_what_sureid_loads(checkpoint):
    """Before: transformers' advice to upgrade transformers."""
    where = str(checkpoint / "config.json")
    for model_type, hint in (("sureid-studnet", "did you mean 'sureid-student'?"), ("bert", "")):
        _edit_config(checkpoint, model_type=model_type)
        for load in (SureidModel.from_pretrained, SureidStudentModel.from_pretrained):
            with pytest.raises(SureidError) as err:
                load(checkpoint)
            message = str(err.value)
            assert message.startswith(f"{where} has model_type {model_type!r}")
            assert "not a SUREID checkpoint" in message and hint in message
            assert "'sureid-student' (SureidStudentModel)" in message
            assert "'sureid-teacher' (SureidTeacherModel)" in message
            assert "upgrade" not in message and "pip install" not in message
    _edit_config(checkpoint, model_type=...)
    with pytest.raises(SureidError, match="has no model_type: not a SUREID checkpoint"):
        SureidModel.from_pretrained(checkpoint)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    """What transformers logs (its loggers do not propagate to pytest's caplog)."""
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def test_a_shape_mismatch_shows_only_the_sureid_error(checkpoint, transformers_log, caplog):
    """Before: transformers' ~30-line load report was logged before the one-line error."""
    other = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), num_identities=12)
    filters = logging.getLogger("transformers.modeling_utils").filters[:]
    with pytest.raises(SureidError, match=r"head\.classifier\.weight.*\(10, 64\).*\(12, 64\)"):
        SureidStudentModel.from_pretrained(checkpoint, config=other)
    assert not [m for m in transformers_log if "LOAD REPORT" in m or "MISMATCH" in m]
    assert logging.getLogger("transformers.modeling_utils").filters == filters  # restored

    # Asked for: the tensors are re-initialised, and one line (not a table) says which.
    with caplog.at_level(logging.WARNING, logger="sureid"):
        SureidStudentModel.from_pretrained(checkpoint, config=other, ignore_mismatched_sizes=True)
    assert not [m for m in transformers_log if "LOAD REPORT" in m]
    (line,) = [r.getMessage() for r in caplog.records if r.name.startswith("sureid")]
    assert "re-initialised: shape mismatch: head.classifier.weight" in line


def test_a_long_mismatch_names_a_few_tensors_and_counts_the_rest(checkpoint):
    wider = SureidStudentConfig(**{**TINY, "hidden_size": 128}, sparsify_layers=(1, 3, 5))
    with pytest.raises(SureidError) as err:
        SureidStudentModel.from_pretrained(checkpoint, config=wider)
    message = str(err.value)
    assert "shape mismatch: encoder." in message and "more)" in message
    assert len(message) < 1500


# -- D. permissions of the saved files ----------------------------------------------------------


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_get_the_umasks_permissions(tmp_path, tiny_student_config, umask):
    """Before: model.safetensors was 0600 under umask 022 (safetensors writes it owner-only),
    so a service account could not read a model another user saved."""
    model = SureidStudentModel(tiny_student_config)
    previous = os.umask(umask)
    try:
        for _ in range(2):  # a new folder, then a save over the same files
            model.save_pretrained(tmp_path / "ckpt")
            modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "ckpt").iterdir()}
            assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= set(modes)
            assert modes == dict.fromkeys(modes, 0o666 & ~umask), modes
    finally:
        os.umask(previous)


def test_local_loads_and_saves_show_no_transformers_progress_bars(tmp_path, capfd):
    """transformers' "Loading weights" / "Writing model shards" bars were noise in every
    command (a SUREID model has a few hundred tensors); hidden for local folders and saves,
    and the bars' setting is left as it was."""
    from transformers.utils import logging as hf_logging

    from sureid import SureidModel, SureidStudentConfig, SureidStudentModel

    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5))
    hf_logging.enable_progress_bar()
    SureidStudentModel(config).save_pretrained(tmp_path / "ckpt")
    SureidModel.from_pretrained(tmp_path / "ckpt")
    printed = capfd.readouterr().err
    assert "Writing model shards" not in printed and "Loading weights" not in printed
    assert hf_logging.is_progress_bar_enabled()


def test_overlapping_loads_restore_the_bars_as_they_were_before_the_first():
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from sureid.modeling_sureid import _no_progress_bars

    hf_logging.enable_progress_bar()
    first = _no_progress_bars()
    second = _no_progress_bars()  # e.g. another thread's load
    assert not hf_logging.is_progress_bar_enabled()
    first()
    assert not hf_logging.is_progress_bar_enabled()  # the second load still runs
    second()
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()


@pytest.mark.slow
def test_an_availability_check_of_transformers_does_not_cancel_the_registration(
    run_offline_python, tmp_path
):
    """accelerate and others ask importlib.util.find_spec("transformers") without importing
    it; SUREID must still register when transformers is then imported."""
    script = (
        "import importlib.util, json, sureid\n"
        "importlib.util.find_spec('transformers')\n"
        "import transformers\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "print(json.dumps(['sureid-student' in CONFIG_MAPPING,\n"
        "      'sureid-feature-extraction' in PIPELINE_REGISTRY.get_supported_tasks()]))\n"
    )
    assert run_offline_python(script, tmp_path / "hf") == [True, True]


@pytest.mark.slow
def test_the_package_gives_its_submodules_as_attributes(run_offline_python, tmp_path):
    """The lazy package still answers sureid.inference and the like (a fresh process: in this
    one, importing a submodule anywhere sets the attribute anyway)."""
    script = (
        "import json, sureid\n"
        "names = [sureid.inference.list_images.__name__, sureid.gallery.GalleryIndex.__name__]\n"
        "try:\n"
        "    sureid.nothing_here\n"
        "except AttributeError as err:\n"
        "    names.append(str(err))\n"
        "print(json.dumps(names))\n"
    )
    assert run_offline_python(script, tmp_path / "hf") == [
        "list_images",
        "GalleryIndex",
        "module 'sureid' has no attribute 'nothing_here'",
    ]
