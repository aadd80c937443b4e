"""The model zoo: `sureid zoo` lists every entry, every recipe parses with its script's own
parser (sureid.cli.train's), zoo ids resolve (a published one through the offline Hub cache,
the demo's from its folder, a recipe to an error that prints it), and `sureid push` against a
patched HfApi."""

from __future__ import annotations

import os
import runpy
import shlex
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled
from PIL import Image

from sureid import (
    SureidError,
    SureidModel,
    SureidStudentConfig,
    SureidStudentModel,
    extract_features,
)
from sureid.cli import build_parser, main
from sureid.cli.train import build_training_parser, parse_training_arguments
from sureid.data.datasets import canonical_dataset_name
from sureid.demo import ROWS, DemoSettings, quick_settings, run_demo
from sureid.trainer import SureidTrainingArguments
from sureid.zoo import (
    DEMO_ZOO_IDS,
    PUSH_IGNORE,
    ZOO,
    demo_folder,
    entry_commands,
    push_checkpoint,
)

from .conftest import TINY

REPO = Path(__file__).resolve().parents[1]
PAPER = [e for e in ZOO.values() if e.status != "local"]
DEMO = [e for e in ZOO.values() if e.status == "local"]


def _options(parser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def _parse(command: str):
    """(script or command name, parsed arguments) of a zoo command, by its own parser.

    The training scripts' parsers are ``sureid.cli.train.build_training_parser``'s; a training
    command must also survive what ``train_main`` does with it (``parse_training_arguments``:
    the dataclasses, their checks), and both readings must agree."""
    tokens = shlex.split(command)
    if tokens[0] == "sureid":
        return "sureid", build_parser().parse_args(tokens[1:])
    assert tokens[:2] == ["accelerate", "launch"], command
    script = REPO / tokens[2]
    role = {"train_teacher.py": "teacher", "train_distill.py": "student"}[script.name]
    parser = runpy.run_path(str(script))["build_parser"]()
    assert _options(parser) == _options(build_training_parser(role)), script.name
    parsed = parser.parse_args(tokens[3:])
    a, training = parse_training_arguments(tokens[3:], role)
    for name, value in vars(a).items():
        assert getattr(parsed, name, value) == value, (command, name)
    for name in SureidTrainingArguments.__dict__["__annotations__"]:
        assert getattr(training, name) == getattr(parsed, name), (command, name)
    return script.name, parsed


# -- the table ---------------------------------------------------------------------------------


def test_sureid_zoo_lists_every_entry(capsys):
    wanted = {"sureid-deit-occduke", "sureid-deit-market", "sureid-deit-duke"}
    wanted |= {"sureid-vit-occreid", "sureid-vit-partialreid", "teacher-vitb-occduke"}
    assert wanted <= set(ZOO) and len(DEMO) == 5
    assert main(["zoo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for entry in ZOO.values():
        (row,) = [line for line in lines if line.startswith(f"| {entry.id} |")]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == entry.kind and cells[5] == f"{entry.keep_rate:g}"
        assert cells[9].split(":")[0] == entry.status
    (row,) = [line for line in lines if line.startswith("| sureid-deit-occduke |")]
    assert row.endswith("| 0.7 | 65.8 | 54.9 | 1585 | recipe |")  # docs/method.md's numbers


def test_paper_entries_are_recipes_with_the_docs_numbers_only():
    docs = (REPO / "docs" / "benchmarks.md").read_text() + (REPO / "docs" / "method.md").read_text()
    for entry in PAPER:
        assert (entry.status, entry.repo_id, entry.revision) == ("recipe", None, None)
        for number in (entry.paper_r1, entry.paper_map, entry.paper_images_per_second):
            assert number is None or f"{number:g}" in docs, (entry.id, number)
        if entry.kind == "student":
            assert ZOO[entry.teacher].kind == "teacher"
            assert ZOO[entry.teacher].commands == entry.commands[:-1]
    assert ZOO["sureid-deit-market"].paper_images_per_second == 1585  # docs/benchmarks.md
    assert ZOO["sureid-vit-occreid"].paper_images_per_second is None  # a ViT-S: not quoted


def test_every_command_parses_with_its_scripts_own_parser():
    for entry in PAPER:
        parsed = [_parse(c) for c in entry.commands]
        scripts = [name for name, _ in parsed]
        if entry.kind == "teacher":
            assert scripts == ["train_teacher.py"], entry.id
        else:
            assert scripts == ["train_teacher.py", "train_distill.py"], entry.id
        last = parsed[-1][1]
        assert canonical_dataset_name(last.dataset) == entry.dataset
        test = last.test_dataset or last.dataset
        assert canonical_dataset_name(test) == entry.test_dataset
        assert last.test_root if last.test_dataset else True
        assert last.timm_model == entry.timm_model and timm.is_model(last.timm_model)
        assert last.output_dir == entry.output_dir
        assert not last.from_scratch and last.init_from is None  # ImageNet weights, as the paper
        if entry.kind == "student":
            assert last.keep_rate == entry.keep_rate
            assert last.teacher == ZOO[entry.teacher].output_dir  # the teacher command's folder
            cross = entry.test_dataset != entry.dataset
            assert (last.alpha, last.color_jitter) == ((2.0, True) if cross else (1.0, False))
    for entry in DEMO:
        ((name, args),) = [_parse(c) for c in entry.commands]
        assert name == "sureid" and args.command == "demo"
        assert entry.local_path.startswith(f"{args.out}/")
    with pytest.raises(SystemExit):  # the check can fail: an option the script does not have
        _parse(ZOO["sureid-deit-occduke"].commands[-1] + " --keep-ratio 0.5")


def test_the_demos_entries_are_its_rows():
    s = DemoSettings()
    assert set(DEMO_ZOO_IDS) == set(ROWS) | {"teacher"}
    for key, zoo_id in DEMO_ZOO_IDS.items():
        entry = ZOO[zoo_id]
        assert entry.local_path == f"{s.out_dir}/{demo_folder(key)}"
        spec = ROWS.get(key)
        assert entry.keep_rate == (s.keep_rate if spec and spec.hts else 1.0)
        assert (entry.teacher == "demo-teacher") == bool(spec and spec.distil)


def test_zoo_show_prints_the_commands_ready_to_paste(capsys):
    entry = ZOO["sureid-vit-partialreid"]
    assert main(["zoo", "show", entry.id, "--data-root", "/mnt/reid data"]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line and not line.startswith("#")]
    assert commands == entry_commands(entry, "/mnt/reid data")
    assert len(commands) == 2
    for command in commands:
        tokens = shlex.split(command)
        assert tokens[tokens.index("--data-root") + 1] == "/mnt/reid data"
    assert "--test-root '/mnt/reid data'" in commands[1]
    assert f"sureid push --model runs/{entry.id}" in out

    assert main(["zoo", "show", "sureid-deit-occdukee"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean sureid-deit-occduke" in err


# -- resolving zoo ids ---------------------------------------------------------------------------


def test_a_recipe_id_raises_an_error_that_prints_the_recipe(tmp_path, capsys):
    entry = ZOO["sureid-deit-occduke"]
    for loader in (SureidModel, SureidStudentModel):
        with pytest.raises(SureidError, match="is a recipe") as err:
            loader.from_pretrained(entry.id)
        for command in entry.commands:
            assert command in str(err.value)
        assert "runs/sureid-deit-occduke" in str(err.value)
    out, image = tmp_path / "gallery", tmp_path / "a.png"
    Image.new("RGB", (32, 64)).save(image)  # a real input: the recipe is the only problem
    assert main(["extract", "--model", entry.id, "--images", str(image), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "examples/train_distill.py" in err
    with pytest.raises(OSError, match="Did you mean sureid-deit-occduke"):  # a misspelt zoo id
        SureidModel.from_pretrained("sureid-deit-occdukee", local_files_only=True)


def _cache_model(repo_dir: Path, revision: str, seed: int) -> SureidStudentModel:
    """One snapshot of HF_HOME/hub/models--org--name, blobs and symlinks as the hub lays them."""
    torch.manual_seed(seed)
    model = SureidStudentModel(
        SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), num_identities=4)
    )
    staging = repo_dir.parent / f"staging-{seed}"
    model.save_pretrained(staging)
    snapshot = repo_dir / "snapshots" / revision
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(staging.iterdir())):
        blob = repo_dir / "blobs" / f"{seed:08x}{i:032x}"
        file.rename(blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return model.eval()


@pytest.mark.slow
def test_a_published_zoo_id_resolves_through_the_offline_hub_cache(tmp_path, run_offline_python):
    """The entry's revision is loaded, not main: the two snapshots hold different weights."""
    pinned, newer = "0123456789abcdef0123456789abcdef01234567", "f" * 40
    hf_home = tmp_path / "hf"
    repo_dir = hf_home / "hub" / "models--org--sureid-deit-occduke"
    expected = {}
    for revision, seed in ((pinned, 0), (newer, 1)):
        model = _cache_model(repo_dir, revision, seed)
        with torch.no_grad():
            expected[revision] = model(torch.zeros(1, 3, 64, 32)).features[0, :4].tolist()
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(newer)
    script = (
        "import json, torch, sureid\n"
        "from sureid import zoo\n"
        "entry = zoo.published(zoo.ZOO['sureid-deit-occduke'], 'org/sureid-deit-occduke', "
        f"{pinned!r})\n"
        "zoo.register(entry)\n"
        "m = sureid.SureidModel.from_pretrained('sureid-deit-occduke').eval()\n"
        "main = sureid.SureidModel.from_pretrained('org/sureid-deit-occduke').eval()\n"
        "x = torch.zeros(1, 3, 64, 32)\n"
        "feats = sureid.extract_features('sureid-deit-occduke', [x[0]], progress=False)\n"
        "print(json.dumps([type(m).__name__, m(x).features[0, :4].tolist(),\n"
        "                  main(x).features[0, :4].tolist(), list(feats.shape)]))\n"
    )
    name, pinned_features, main_features, shape = run_offline_python(script, hf_home)
    assert name == "SureidStudentModel" and shape == [1, 64]
    assert pinned_features == pytest.approx(expected[pinned], abs=1e-5)
    assert main_features == pytest.approx(expected[newer], abs=1e-5)
    assert expected[pinned] != pytest.approx(expected[newer], abs=1e-3)


@pytest.mark.slow
def test_the_demos_entries_load_offline_with_their_cards(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SureidError, match="sureid demo --out sureid-demo"):
        SureidModel.from_pretrained("demo-sureid")  # not built here yet
    settings = quick_settings(out_dir="sureid-demo", rows=("dense", "hts+npkd+noda"), threads=1)
    dense, sureid_row, teacher_row = run_demo(settings, log=lambda _m: None)

    model = SureidModel.from_pretrained("demo-sureid")
    assert isinstance(model, SureidStudentModel) and model.config.keep_rate == 0.7
    image = torch.rand(3, 64, 32)
    assert extract_features("demo-dense", [image], progress=False).shape == (1, 32)
    card = ModelCard.load("sureid-demo/hts_npkd_noda/README.md")
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {
        "R1": round(100 * sureid_row.rank1, 2),
        "mAP": round(100 * sureid_row.mAP, 2),
    }
    assert card.data.model_name == "demo-sureid" and card.data.datasets == ["synthetic"]
    speedup = sureid_row.speedup  # median over the timed rounds of the same-round ratio
    assert f"| speed-up over {dense.name} | {speedup:.2f}x |" in card.text
    assert "Teacher (NPKD): the demo's teacher (sureid-demo/teacher)" in card.text
    teacher_card = ModelCard.load("sureid-demo/teacher/README.md")
    assert teacher_card.data.eval_results[0].metric_value == round(100 * teacher_row.rank1, 2)

    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "local: sureid-demo/hts_npkd_noda (built)" in out
    assert "local: sureid-demo/hts (not built)" in out  # that row was not run


# -- publishing -----------------------------------------------------------------------------------


class FakeApi:
    """huggingface_hub.HfApi as push uses it, recording the calls (no network)."""

    calls: list = []
    fail_with: BaseException | None = None

    def __init__(self, token=None):
        FakeApi.calls.append(("token", token))

    def create_repo(self, repo_id, **kwargs):
        if FakeApi.fail_with is not None:
            raise FakeApi.fail_with
        FakeApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs))
        url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123"
        return SimpleNamespace(commit_url=url, oid="abc123")


@pytest.fixture
def hub(monkeypatch):
    """A patched HfApi, online, with a token in HF_TOKEN."""
    FakeApi.calls, FakeApi.fail_with = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return FakeApi


@pytest.fixture
def checkpoint(tmp_path, tiny_student_config):
    folder = tmp_path / "ckpt"
    SureidStudentModel(tiny_student_config).save_pretrained(folder)  # weights and a card
    (folder / "checkpoint-3").mkdir()  # a training run's leftovers are not uploaded
    return folder


def test_push_creates_the_repo_and_uploads_the_folder(hub, checkpoint, capsys):
    argv = ["push", "--model", str(checkpoint), "--repo-id", "org/sureid-tiny"]
    assert main([*argv, "--private", "--revision", "v1"]) == 0
    assert hub.calls[0] == ("token", "hf_test_token")
    assert hub.calls[1] == (
        "create_repo",
        "org/sureid-tiny",
        {"private": True, "repo_type": "model", "exist_ok": True},
    )
    assert hub.calls[2][:2] == ("create_branch", "org/sureid-tiny")
    assert hub.calls[2][2]["branch"] == "v1"
    upload = hub.calls[3][1]
    assert upload["repo_id"] == "org/sureid-tiny" and upload["folder_path"] == str(checkpoint)
    assert upload["revision"] == "v1" and set(PUSH_IGNORE) <= set(upload["ignore_patterns"])
    out = capsys.readouterr().out
    assert "https://huggingface.co/org/sureid-tiny/commit/abc123" in out
    assert "SureidModel.from_pretrained('org/sureid-tiny', revision='v1')" in out

    hub.calls.clear()
    push_checkpoint(checkpoint, "org/sureid-tiny")
    assert [c[0] for c in hub.calls] == ["token", "create_repo", "upload_folder"]
    assert hub.calls[1][2]["private"] is False and hub.calls[2][1]["revision"] is None


def test_push_refuses_a_folder_without_weights_or_card(hub, checkpoint, tmp_path, capsys):
    def push(folder, repo_id="org/sureid-tiny"):
        code = main(["push", "--model", str(folder), "--repo-id", repo_id])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        return err

    assert "ORG/NAME" in push(checkpoint, "sureid-tiny")
    assert "not a folder" in push(tmp_path / "missing")
    (checkpoint / "README.md").unlink()
    assert "has no model card (README.md)" in push(checkpoint)
    (checkpoint / "README.md").write_text("# card\n")
    (checkpoint / "model.safetensors").unlink()
    assert "has no weights (model.safetensors)" in push(checkpoint)
    assert hub.calls == []  # refused before anything reached the Hub


def test_push_offline_or_without_a_token_says_so_in_one_line(hub, checkpoint, monkeypatch, capsys):
    argv = ["push", "--model", str(checkpoint), "--repo-id", "org/sureid-tiny"]

    def error() -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sureid push: error: cannot push"), err
        return err

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in error()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN")
    assert "no Hugging Face token: set HF_TOKEN" in error()
    assert hub.calls == []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    # what the real HfApi raises when the network is off, the token missing or the Hub unreachable
    for failure, message in (
        (OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline"), "offline mode"),
        (LocalTokenNotFoundError("Token is required"), "set HF_TOKEN or log in"),
        (ConnectionError("Failed to resolve\n'huggingface.co'"), "cannot reach the Hugging Face"),
    ):
        hub.fail_with = failure
        assert message in error()


# -- where the demo's checkpoints are, and what the docs say can be loaded (issue 23) -------------


@pytest.fixture(autouse=True)
def _no_recorded_demo(tmp_path_factory, monkeypatch):
    """No test here reads or writes the user's record of the demo (~/.cache/sureid/demo.json)
    or sees their SUREID_DEMO_DIR: HOME and XDG_CACHE_HOME point at an empty folder."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.delenv("SUREID_DEMO_DIR", raising=False)
    monkeypatch.delenv("SUREID_CACHE", raising=False)


def _demo_checkpoint(out_dir: Path) -> SureidStudentModel:
    """A tiny student saved where `sureid demo --out OUT_DIR` saves its last row."""
    torch.manual_seed(0)
    model = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5)))
    model.save_pretrained(out_dir / demo_folder("hts+npkd+noda"))
    return model


def test_demo_ids_resolve_from_the_env_var_the_recorded_folder_then_here(
    tmp_path, monkeypatch, capsys
):
    """Before: a demo id loaded only in the folder where the demo ran."""
    import json

    from sureid.zoo import (
        DEMO_DIR_ENV,
        demo_record_file,
        record_demo_location,
        resolve_zoo_id,
    )

    entry = ZOO["demo-sureid"]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    record = demo_record_file()
    assert record == Path(os.environ["XDG_CACHE_HOME"]) / "sureid" / "demo.json"

    # Built nowhere: the error says where it looked.
    with pytest.raises(SureidError) as err:
        SureidModel.from_pretrained(entry.id)
    message = str(err.value)
    assert f"${DEMO_DIR_ENV}: not set" in message and f"none recorded in {record}" in message
    assert f"the current folder: {work / entry.local_path} (not built)" in message
    assert "sureid demo --out sureid-demo" in message

    # The demo ran in another folder and recorded it: the id loads from here.
    out = tmp_path / "elsewhere" / "out"
    model = _demo_checkpoint(out)
    assert record_demo_location(out) == record
    assert json.loads(record.read_text())["out_dir"] == str(out.resolve())
    built = out / "hts_npkd_noda"
    assert resolve_zoo_id(entry.id, {}) == (str(built), {})
    loaded = SureidModel.from_pretrained(entry.id)
    assert torch.equal(loaded.encoder.pos_embed, model.encoder.pos_embed)
    assert main(["zoo", "show", entry.id]) == 0
    shown = capsys.readouterr().out
    assert f"# status: local: {built} (built)" in shown
    assert f"#   the last demo run (recorded in {record}): {built} (built)" in shown
    assert f"#   the current folder: {work / entry.local_path} (not built)" in shown

    # SUREID_DEMO_DIR wins, and is then the only place looked in.
    monkeypatch.setenv(DEMO_DIR_ENV, str(tmp_path / "empty"))
    with pytest.raises(SureidError) as err:
        SureidModel.from_pretrained(entry.id)
    assert f"${DEMO_DIR_ENV}: {tmp_path / 'empty' / 'hts_npkd_noda'} (not built)" in str(err.value)
    assert "recorded" not in str(err.value)
    monkeypatch.setenv(DEMO_DIR_ENV, str(out))
    assert resolve_zoo_id(entry.id, {})[0] == str(built)

    # A recorded folder without the checkpoint: ./sureid-demo, as before.
    monkeypatch.delenv(DEMO_DIR_ENV)
    record_demo_location(tmp_path / "empty")
    _demo_checkpoint(work / "sureid-demo")
    assert resolve_zoo_id(entry.id, {})[0] == "sureid-demo/hts_npkd_noda"
    assert main(["zoo"]) == 0
    assert "local: sureid-demo/hts_npkd_noda (built)" in capsys.readouterr().out

    # A cache folder that cannot be written: nothing recorded, no error (the demo goes on).
    monkeypatch.setenv("XDG_CACHE_HOME", str(record))  # a file, not a folder
    assert record_demo_location(out) is None


def test_the_docs_say_what_can_be_loaded_today():
    """docs/zoo.md and docs/index.md say what loads (no real-data checkpoint is published yet,
    the demo's are trained on drawn people), what each status means and which command prints
    a recipe."""
    from sureid.zoo import STATUSES

    zoo_md = (REPO / "docs" / "zoo.md").read_text()
    index_md = (REPO / "docs" / "index.md").read_text()
    readme = (REPO / "README.md").read_text()
    published = [e.id for e in ZOO.values() if e.status == "published"]
    # README's snippet used to promise a checkpoint under "path/or/org-name"
    assert "path/or/org-name" not in readme and "zoo.md#what-you-can-load-today" in readme
    for text in (zoo_md, index_md, readme):
        assert published or "No checkpoint trained on real data is published" in text
        assert "sureid zoo show ID" in text and "drawn people" in text
    section = zoo_md.split("## What you can load today")[1].split("\n## ")[0]
    for status in STATUSES:
        assert f"| `{status}` |" in section, status
    assert "zoo.md#what-you-can-load-today" in index_md
    assert "SUREID_DEMO_DIR" in zoo_md and "HF_HUB_OFFLINE=1" in zoo_md
