"""``sureid train teacher|student`` (sureid.cli.train): flags built from the dataclasses (every
SUREID training field, with its help), the aliases, the required --output-dir, retired flags
refused, --init-from, the wiring of train_main and --eval-every-epochs."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from transformers import TrainerControl, TrainerState

from sureid import SureidError, SureidStudentModel
from sureid.cli import main
from sureid.cli.train import (
    EvaluateEveryEpochs,
    _build_model,
    _load_init_from,
    build_training_parser,
    parse_training_arguments,
    train_main,
)
from sureid.trainer import SureidTrainer, SureidTrainingArguments

from .conftest import TINY
from .test_trainer import NUM_IDS, _teacher

REQUIRED = ["--dataset", "synthetic", "--data-root", "data", "--output-dir", "out"]


def _own_fields() -> list[dataclasses.Field]:
    """The fields SureidTrainingArguments declares itself (not those it inherits)."""
    own = SureidTrainingArguments.__dict__["__annotations__"]
    return [f for f in dataclasses.fields(SureidTrainingArguments) if f.name in own]


def _flags(parser) -> dict[str, object]:
    """Every option string of ``parser`` -> its argparse action."""
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_every_sureid_training_field_is_a_flag_with_its_help():
    flags = _flags(build_training_parser("student"))
    fields = _own_fields()
    assert {f.name for f in fields} >= {"lambda_ratio", "noda", "predictor_learning_rate"}
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        assert flag in flags, f"{f.name} has no {flag} flag"
        assert flags[flag].dest == f.name
        assert flags[flag].help == f.metadata["help"], flag
        assert f.metadata["help"].strip(), f"{f.name} has no help"


def test_sureid_training_arguments_stay_small():
    """Options beyond the paper's are added with care: at most 26 fields of its own."""
    own = SureidTrainingArguments.__dict__["__annotations__"]
    assert len(own) <= 26, sorted(own)


def test_aliases_and_negations_set_the_training_arguments():
    argv = [*REQUIRED, "--lr", "0.03", "--epochs", "7", "--batch-size", "16", "--no-noda"]
    argv += ["--predictor-learning-rate", "0.3", "--lambda-token", "0.5"]
    a, args = parse_training_arguments(argv, "student")
    assert isinstance(args, SureidTrainingArguments)
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size) == (
        0.03,
        7,
        16,
    )
    assert args.noda is False and args.predictor_learning_rate == 0.3
    assert args.lambda_token == 0.5 and args.output_dir == "out" == a.output_dir
    # the long names work as well as the aliases
    _, same = parse_training_arguments([*REQUIRED, "--learning-rate", "0.03"], "student")
    assert same.learning_rate == 0.03
    # the command line's own defaults, and the paper's everywhere else
    a, args = parse_training_arguments(REQUIRED, "student")
    assert args.dataloader_num_workers == 4 and args.save_total_limit == 2
    assert args.noda is True and args.learning_rate == 0.008 and args.lambda_token == 0.0
    assert (a.dataset, a.data_root, a.keep_rate, a.teacher) == ("synthetic", "data", 0.7, None)
    assert a.timm_model == "deit_small_distilled_patch16_224" and not a.check_token_selection
    _, args = parse_training_arguments([*REQUIRED, "--dataloader-num-workers", "0"], "teacher")
    assert args.dataloader_num_workers == 0
    a, _ = parse_training_arguments([*REQUIRED, "--check-token-selection"], "student")
    assert a.check_token_selection is True


def test_the_teacher_parser_has_no_student_options():
    teacher = _flags(build_training_parser("teacher"))
    student = _flags(build_training_parser("student"))
    for flag in ("--teacher", "--keep-rate", "--sparsify-layers", "--hts-sampling"):
        assert flag not in teacher and flag in student, flag
    assert "--lambda-ratio" in teacher  # the training fields are shared
    # the teacher's namespace still has the student's names, unset
    a, _ = parse_training_arguments(REQUIRED, "teacher")
    assert a.teacher is None and a.keep_rate is None and a.check_token_selection is False
    assert a.timm_model == "vit_base_patch16_224"
    with pytest.raises(ValueError, match="role must be 'teacher' or 'student'"):
        build_training_parser("dense")


def test_the_output_dir_is_required(capsys):
    with pytest.raises(SystemExit):
        parse_training_arguments(["--dataset", "synthetic", "--data-root", "data"], "student")
    assert "the following arguments are required: --output-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the data set too, by the parser itself
        parse_training_arguments(["--output-dir", "out"], "teacher")
    assert "--dataset" in capsys.readouterr().err


@pytest.mark.parametrize(
    "retired",
    [
        ["--ratio-on", "probabilities"],
        ["--token-guidance", "cls-attention"],
        ["--workers", "0"],
        ["--predictor-lr", "0.08"],
        ["--feature-reduction", "sum"],
        ["--lambda-occlusion", "0.5"],
        ["--freeze-backbone-steps", "10"],
    ],
)
def test_retired_flags_are_refused(retired, capsys):
    with pytest.raises(ValueError, match=re.escape(retired[0])):
        parse_training_arguments([*REQUIRED, *retired], "student")
    with pytest.raises(SystemExit):
        build_training_parser("student").parse_args([*REQUIRED, *retired])
    assert f"unrecognized arguments: {' '.join(retired)}" in capsys.readouterr().err


def test_retired_topk_sampling_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_training_arguments([*REQUIRED, "--hts-sampling", "topk"], "student")
    err = capsys.readouterr().err
    assert "invalid choice: 'topk'" in err and "'gumbel-topk'" in err
    a, _ = parse_training_arguments([*REQUIRED, "--hts-sampling", "gumbel-topk"], "student")
    assert a.hts_sampling == "gumbel-topk"


def test_sureid_train_reports_a_retired_flag_in_one_line(tmp_path, capsys):
    command = ["train", "student", "--dataset", "synthetic", "--data-root", str(tmp_path / "d")]
    command += ["--output-dir", str(tmp_path / "out"), "--workers", "0"]
    assert main(command) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert line.startswith("sureid train: error:") and "'--workers'" in line
    assert not (tmp_path / "d").exists()  # refused before any data is made


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


def test_init_from_builds_the_student_from_any_checkpoint(tmp_path):
    """--init-from: the checkpoint's architecture and weights, a new classifier for other
    identities, the HTS options from the command line; a wrong --image-size is refused."""
    source = _teacher(seed=3)  # a dense checkpoint of NUM_IDS identities
    source.save_pretrained(tmp_path / "dense")
    argv = [*REQUIRED, "--init-from", str(tmp_path / "dense"), "--keep-rate", "0.5"]
    argv += ["--sparsify-layers", "1", "3", "5", "--hts-sampling", "gumbel-topk"]
    a, _ = parse_training_arguments(argv, "student")
    loaded = _load_init_from(a.init_from, a.image_size)
    model = _build_model(a, "student", NUM_IDS + 2, loaded)
    assert isinstance(model, SureidStudentModel)
    assert model.config.keep_rate == 0.5 and model.config.hts_sampling == "gumbel-topk"
    assert list(model.config.sparsify_layers) == [1, 3, 5]
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


def _use_trainer(monkeypatch, cls) -> None:
    """Make train_main build ``cls`` instead of SureidTrainer, whether sureid.cli.train imports
    the trainer at module level or inside train_main."""
    import sureid.cli.train as cli_train
    import sureid.trainer

    monkeypatch.setattr(sureid.trainer, "SureidTrainer", cls)
    monkeypatch.setattr(cli_train, "SureidTrainer", cls, raising=False)


def _complete_checkpoint(path):
    """The files that make a checkpoint-N folder complete (sureid.checkpointing)."""
    path.mkdir(parents=True)
    for name, text in (("config.json", "{}"), ("trainer_state.json", '{"global_step": 3}')):
        (path / name).write_text(text)
    (path / "model.safetensors").write_bytes(b"")
    return path


def _no_data_or_model(monkeypatch) -> None:
    """Fail the test when train_main gets as far as loading data or a checkpoint, or building
    the model (what the checks before them are there to spare)."""
    import sureid.cli.train as cli_train

    def reached(*args, **kwargs):
        raise AssertionError("train_main loaded data or a model before refusing the options")

    for name in ("_load_training_data", "_build_model", "_load_teacher", "_load_init_from"):
        monkeypatch.setattr(cli_train, name, reached)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_train_role_help_names_the_command(role, capsys):
    with pytest.raises(SystemExit, match="^0$"):
        main(["train", role, "--help"])
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: sureid train {role} ")
    assert "--output-dir" in printed or "--output_dir" in printed


def test_an_output_dir_that_cannot_be_made_is_refused_before_the_data(
    tmp_path, monkeypatch, capsys
):
    """--output-dir under a regular file can be created by no one (root included): refused
    first, naming the path and the file in the way (it used to fail only at the first save)."""
    _no_data_or_model(monkeypatch)
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = blocker / "out"
    command = ["train", "teacher", "--dataset", "synthetic", "--data-root", str(tmp_path / "d")]
    command += ["--from-scratch", "--output-dir", str(out)]
    assert main(command) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert line.startswith("sureid train: error: --output-dir ")
    assert f"{out}: cannot create the folder, {blocker} is a file, not a folder" in line
    assert not (tmp_path / "d").exists()  # refused before any data is made


def test_resume_latest_without_a_checkpoint_is_refused_before_the_data(
    tmp_path, monkeypatch, capsys
):
    _no_data_or_model(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    command = ["train", "student", "--dataset", "synthetic", "--data-root", str(tmp_path / "d")]
    command += ["--output-dir", str(out), "--resume", "latest", "--teacher", str(tmp_path / "t")]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"no complete checkpoint-N folder in {out} to resume from ('latest')" in err
    assert not (tmp_path / "d").exists()
    # a named checkpoint that is not one is refused as early
    command[command.index("latest")] = str(out / "checkpoint-9")
    assert main(command) == 2
    assert f"cannot resume: no such folder: {out / 'checkpoint-9'}" in capsys.readouterr().err


class _RecordingTrainer:
    """Stands in for SureidTrainer in train_main: records what it is given, trains nothing."""

    made: list[_RecordingTrainer] = []

    def __init__(self, model, args, **kwargs):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.calls: list[tuple] = []
        _RecordingTrainer.made.append(self)

    def train(self, resume_from_checkpoint=None):
        self.calls.append(("train", resume_from_checkpoint))

    def save_model(self, output_dir=None):
        self.calls.append(("save_model", output_dir))

    def evaluate(self):
        self.calls.append(("evaluate",))
        return {"eval_R1": 0.5, "eval_mAP": 0.25, "eval_mINP": 0.125}

    def write_model_card(self, output_dir=None):
        self.calls.append(("write_model_card", output_dir))


def test_train_main_hands_the_options_to_the_trainer(tmp_path, monkeypatch, tiny_synthetic_root):
    """What train_main builds and passes: the data, the trainer arguments, the evaluation
    protocol, the token-selection check, the resume point, the card's command."""
    _RecordingTrainer.made = []
    _use_trainer(monkeypatch, _RecordingTrainer)
    out = tmp_path / "out"
    _complete_checkpoint(out / "checkpoint-3")  # what --resume latest finds
    argv = ["--dataset", "synthetic", "--data-root", str(tiny_synthetic_root), "--from-scratch"]
    argv += ["--output-dir", str(out), "--image-size", "64", "32", "--patch-size", "8"]
    argv += ["--hidden-size", "32", "--depth", "2", "--heads", "2", "--sparsify-layers", "1"]
    argv += ["--batch-size", "4", "--num-instances", "2", "--check-token-selection"]
    argv += ["--resume", "latest", "--eval-every-epochs", "3", "--lambda-token", "0.5"]
    metrics = train_main(argv, "student")
    ((trainer),) = _RecordingTrainer.made
    assert metrics == {"eval_R1": 0.5, "eval_mAP": 0.25, "eval_mINP": 0.125}
    assert isinstance(trainer.model, SureidStudentModel)
    assert trainer.model.config.num_identities == 4  # the tiny set's train identities
    assert trainer.args.lambda_token == 0.5 and trainer.args.output_dir == str(out)
    kwargs = trainer.kwargs
    assert kwargs["check_token_selection"] is True and kwargs["teacher"] is None
    assert kwargs["eval_protocol"] == "market"
    assert set(kwargs["eval_dataset"]) == {"query", "gallery"}
    assert set(kwargs["train_dataset"]["pid"]) == {0, 1, 2, 3}
    ((callback),) = kwargs["callbacks"]
    assert isinstance(callback, EvaluateEveryEpochs) and callback.every == 3
    assert trainer.calls == [
        ("train", "latest"),
        ("save_model", str(out)),
        ("evaluate",),
        ("write_model_card", str(out)),
    ]
    command = trainer.model_card_info["command"]
    assert command.startswith("sureid train student --dataset synthetic --data-root ")
    assert trainer.model_card_info["started_from"] == "random weights (--from-scratch)"
    # a teacher run: no token-selection check, no callback without --eval-every-epochs
    _RecordingTrainer.made = []
    teacher_argv = argv[: argv.index("--sparsify-layers")] + ["--batch-size", "4"]
    train_main([*teacher_argv, "--num-instances", "2"], "teacher")
    ((teacher),) = _RecordingTrainer.made
    assert teacher.kwargs["check_token_selection"] is False
    assert teacher.kwargs["callbacks"] is None
    assert teacher.calls[0] == ("train", None)


@pytest.mark.slow
def test_train_main_evaluates_every_nth_epoch(tmp_path, monkeypatch, tiny_synthetic_root):
    """--eval-every-epochs 2 over 3 epochs: one evaluation after epoch 2, then the final one
    (evaluating every epoch gave 1, 2, 3 and the final one)."""
    seen = []
    evaluate = SureidTrainer.evaluate

    def recording(self, *args, **kwargs):
        seen.append(self.state.epoch)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(SureidTrainer, "evaluate", recording)
    argv = ["--dataset", "synthetic", "--data-root", str(tiny_synthetic_root), "--from-scratch"]
    argv += ["--output-dir", str(tmp_path / "out"), "--image-size", "64", "32"]
    argv += ["--patch-size", "8", "--hidden-size", "32", "--depth", "2", "--heads", "2"]
    argv += ["--epochs", "3", "--batch-size", "4", "--num-instances", "2"]
    argv += ["--dataloader-num-workers", "0", "--eval-every-epochs", "2", "--report-to", "none"]
    metrics = train_main(argv, "teacher")
    assert seen == [2.0, 3.0]  # epoch 2 by the callback, then train_main's own at the end
    assert {"eval_R1", "eval_mAP", "eval_mINP"} <= metrics.keys()
    assert (tmp_path / "out" / "model.safetensors").is_file()
