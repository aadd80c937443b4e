"""The model zoo: the paper's checkpoints and their teachers in one table, and publishing.

Every entry says what it is (data set, backbone, keep rate), how to make it (the exact
``examples/train_teacher.py`` / ``examples/train_distill.py`` commands), what the paper reports
for it (``None`` where docs/benchmarks.md and docs/method.md quote no number: nothing is
invented) and where it is:

- ``recipe``: no checkpoint is published; ``SureidModel.from_pretrained(ID)`` raises an error
  that prints the commands;
- ``published``: on the Hugging Face Hub as ``repo_id`` at ``revision``; ``from_pretrained(ID)``
  loads it (through the local cache when offline);
- ``local``: the demo's checkpoints, built by ``sureid demo`` (into ``sureid-demo/`` by
  default); ``from_pretrained(ID)`` finds them through ``$SUREID_DEMO_DIR``, else the folder the
  last demo run recorded (``demo_record_file()``), else ``./sureid-demo`` (``local_candidates``).

``sureid zoo`` prints the table, ``sureid zoo show ID`` one entry's commands, ``sureid push``
(``push_checkpoint``) uploads a trained folder (weights and model card) to the Hub. To publish
an entry, push its folder, then set its status to ``published`` with the repo id and the
revision (a commit hash) here. docs/zoo.md describes the round trip.
"""

from __future__ import annotations

import difflib
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import SureidError
from .hooks import register_checkpoint_hooks

STATUSES = ("recipe", "published", "local")
KINDS = ("teacher", "student")
# Where `sureid demo` writes by default (DemoSettings.out_dir), and its rows' zoo ids.
DEMO_OUT = "sureid-demo"
DEMO_ZOO_IDS = {
    "teacher": "demo-teacher",
    "dense": "demo-dense",
    "hts": "demo-hts",
    "hts+npkd": "demo-hts-npkd",
    "hts+npkd+noda": "demo-sureid",
}
# The paper's speed of its DeiT-S student at keep 0.7 (docs/benchmarks.md: Tables IV and V).
_PAPER_GPU = "one RTX 2080Ti, batch 32"
# What `sureid push` never uploads from a training run's folder: checkpoints with their
# optimizer state, logs, pickles.
PUSH_IGNORE = ("checkpoint-*", "tmp-checkpoint-*", "runs/*", "*.bin", "*.pt", "*.pth")


# The data sets' usual names (the metadata lists the names `--dataset` takes).
DATASET_TITLES = {
    "market1501": "Market-1501",
    "dukemtmc": "DukeMTMC-reID",
    "occluded_duke": "Occluded-Duke",
    "occluded_reid": "Occluded-REID",
    "partial_reid": "Partial-REID",
    "synthetic": "synthetic (built in)",
    "folder": "a custom folder data set",
    "unnamed": "an evaluation set the card does not name",
}


def dataset_title(name: str | None) -> str:
    """The usual name of a data set (``"occluded_duke"`` -> ``"Occluded-Duke"``)."""
    if name is None:
        return "-"
    return DATASET_TITLES.get(_canonical(name), name)


def _canonical(name: str) -> str:
    if name in DATASET_TITLES:  # already canonical: no need to load the data layer
        return name
    from .data.datasets import canonical_dataset_name

    try:
        return canonical_dataset_name(name)
    except ValueError:
        return name


def demo_folder(key: str) -> str:
    """The folder (under the demo's ``--out``) of a demo row's checkpoint: ``hts+npkd`` ->
    ``hts_npkd`` (``demo.train_student``'s default name), ``teacher`` -> ``teacher``."""
    return key.replace("+", "_")


@dataclass(frozen=True)
class ZooEntry:
    """One checkpoint of the zoo.

    Args:
        id (`str`): the zoo id, ``SureidModel.from_pretrained(id)`` (no organisation).
        kind (`str`): ``"teacher"`` or ``"student"``.
        dataset (`str`): the training set (a ``load_reid_dataset`` name).
        test_dataset (`str`): the set it is evaluated on (differs for the cross-domain rows).
        backbone (`str`): the encoder, in words.
        keep_rate (`float`): the student's keep rate p; 1.0 for dense models.
        commands (`tuple[str, ...]`): the commands that make it, in order (a student's teacher
            first).
        timm_model (`str`, *optional*): the timm ImageNet model it starts from.
        teacher (`str`, *optional*): the zoo id of its NPKD teacher.
        paper_r1 (`float`, *optional*): the paper's rank-1 (%); None when it reports none.
        paper_map (`float`, *optional*): the paper's mAP (%); None when it reports none.
        paper_images_per_second (`float`, *optional*): the paper's throughput; None likewise.
        paper_speed_setting (`str`, *optional*): the device and batch of that throughput.
        status (`str`, *optional*, defaults to `"recipe"`): ``"recipe"``, ``"published"`` or
            ``"local"``.
        repo_id (`str`, *optional*): the Hub repo of a published entry.
        revision (`str`, *optional*): the commit (or branch) of a published entry.
        local_path (`str`, *optional*): the folder of a local entry, relative to the current
            folder; a demo entry's (``sureid-demo/...``) is also looked for under
            ``$SUREID_DEMO_DIR`` and the folder the demo recorded (``local_candidates``).
        notes (`str`, *optional*): anything else a user needs to know.

    Example:

    ```python
    >>> from sureid.zoo import ZOO
    >>> entry = ZOO["sureid-deit-occduke"]
    >>> entry.status, entry.teacher, entry.paper_images_per_second
    ('recipe', 'teacher-vitb-occduke', 1585.0)
    ```
    """

    id: str
    kind: str
    dataset: str
    test_dataset: str
    backbone: str
    keep_rate: float
    commands: tuple[str, ...]
    timm_model: str | None = None
    teacher: str | None = None
    paper_r1: float | None = None
    paper_map: float | None = None
    paper_images_per_second: float | None = None
    paper_speed_setting: str | None = None
    status: str = "recipe"
    repo_id: str | None = None
    revision: str | None = None
    local_path: str | None = None
    notes: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"zoo entry {self.id}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.status not in STATUSES:
            raise ValueError(
                f"zoo entry {self.id}: status must be one of {STATUSES}, got {self.status!r}"
            )
        if "/" in self.id:
            raise ValueError(f"zoo entry {self.id}: a zoo id has no '/' (that is a repo id)")
        if self.status == "published" and not (self.repo_id and self.revision):
            raise ValueError(f"zoo entry {self.id}: a published entry needs repo_id and revision")
        if self.status == "local" and not self.local_path:
            raise ValueError(f"zoo entry {self.id}: a local entry needs local_path")
        if not self.commands:
            raise ValueError(f"zoo entry {self.id}: no commands")

    @property
    def output_dir(self) -> str | None:
        """The folder the last command writes the checkpoint to (``--output-dir``)."""
        if self.local_path:
            return self.local_path
        return _option(self.commands[-1], "--output-dir")


def _option(command: str, flag: str) -> str | None:
    tokens = shlex.split(command)
    for i, token in enumerate(tokens[:-1]):
        if token == flag:
            return tokens[i + 1]
    return None


def _teacher_command(dataset: str, out: str, *extra: str) -> str:
    args = ["--dataset", dataset, "--data-root", "/data", *extra, "--output-dir", out]
    return shlex.join(["accelerate", "launch", "examples/train_teacher.py", *args])


def _student_command(dataset: str, teacher_out: str, out: str, *extra: str) -> str:
    args = ["--dataset", dataset, "--data-root", "/data", *extra]
    args += ["--teacher", teacher_out, "--keep-rate", "0.7", "--output-dir", out]
    return shlex.join(["accelerate", "launch", "examples/train_distill.py", *args])


def _paper_entries() -> list[ZooEntry]:
    """The paper's teachers, its DeiT-S students and its cross-domain ViT-S students."""
    teachers = _paper_teachers()
    by_id = {e.id: e for e in teachers}
    return [*teachers, *_paper_students(by_id), *_cross_domain_students(by_id)]


def _paper_teachers() -> list[ZooEntry]:
    vit_b = dict(backbone="ViT-B/16", timm_model="vit_base_patch16_224", keep_rate=1.0)
    teachers = {
        "teacher-vitb-occduke": ("occluded_duke", "runs/teacher-vitb-occduke", ()),
        "teacher-vitb-market": ("market1501", "runs/teacher-vitb-market", ()),
        "teacher-vitb-duke": ("dukemtmc", "runs/teacher-vitb-duke", ()),
        # the cross-domain rows' teacher: Market-1501 with colour jitter, as its students
        "teacher-vitb-market-cj": (
            "market1501",
            "runs/teacher-vitb-market-cj",
            ("--color-jitter",),
        ),
    }
    return [
        ZooEntry(
            id=tid,
            kind="teacher",
            dataset=dataset,
            test_dataset=dataset,
            commands=(_teacher_command(dataset, out, *extra),),
            **vit_b,
        )
        for tid, (dataset, out, extra) in teachers.items()
    ]


def _paper_students(by_id: dict[str, ZooEntry]) -> list[ZooEntry]:
    entries = []
    deit = dict(
        backbone="DeiT-S (distilled)",
        timm_model="deit_small_distilled_patch16_224",
        keep_rate=0.7,
        paper_images_per_second=1585.0,
        paper_speed_setting=_PAPER_GPU,
    )
    # the paper's R1 / mAP (docs/method.md#the-papers-numbers)
    for sid, tid, dataset, r1, m_ap in (
        ("sureid-deit-occduke", "teacher-vitb-occduke", "occluded_duke", 65.8, 54.9),
        ("sureid-deit-market", "teacher-vitb-market", "market1501", 94.5, 87.2),
        ("sureid-deit-duke", "teacher-vitb-duke", "dukemtmc", 89.1, 79.7),
    ):
        teacher = by_id[tid]
        out = f"runs/{sid}"
        entries.append(
            ZooEntry(
                id=sid,
                kind="student",
                dataset=dataset,
                test_dataset=dataset,
                teacher=tid,
                commands=(*teacher.commands, _student_command(dataset, teacher.output_dir, out)),
                paper_r1=r1,
                paper_map=m_ap,
                **deit,
            )
        )
    return entries


def _cross_domain_students(by_id: dict[str, ZooEntry]) -> list[ZooEntry]:
    entries, cj = [], by_id["teacher-vitb-market-cj"]
    for sid, test, r1, m_ap in (
        ("sureid-vit-occreid", "occluded_reid", 86.8, 80.7),
        ("sureid-vit-partialreid", "partial_reid", 85.3, None),  # the paper gives R1 / R3
    ):
        extra = ("--timm-model", "vit_small_patch16_224", "--alpha", "2", "--color-jitter")
        extra += ("--test-dataset", test, "--test-root", "/data")
        entries.append(
            ZooEntry(
                id=sid,
                kind="student",
                dataset="market1501",
                test_dataset=test,
                backbone="ViT-S/16",
                timm_model="vit_small_patch16_224",
                keep_rate=0.7,
                paper_r1=r1,
                paper_map=m_ap,
                teacher=cj.id,
                commands=(
                    *cj.commands,
                    _student_command("market1501", cj.output_dir, f"runs/{sid}", *extra),
                ),
                notes="cross-domain: trained on Market-1501, tested on the test-only set",
            )
        )
    return entries


def _demo_entries() -> list[ZooEntry]:
    entries = []
    for key, zid in DEMO_ZOO_IDS.items():
        teacher = key == "teacher"
        entries.append(
            ZooEntry(
                id=zid,
                kind="teacher" if teacher else "student",
                dataset="synthetic",
                test_dataset="synthetic",
                backbone="demo ViT, teacher width" if teacher else "demo ViT, DeiT-S-like",
                keep_rate=1.0 if key in ("teacher", "dense") else 0.7,
                commands=(f"sureid demo --out {DEMO_OUT}",),
                teacher="demo-teacher" if "npkd" in key else None,
                status="local",
                local_path=f"{DEMO_OUT}/{demo_folder(key)}",
                notes="built by `sureid demo` (synthetic set, CPU, minutes)",
            )
        )
    return entries


# The zoo: id -> entry. Publishing an entry = setting status, repo_id and revision here.
ZOO: dict[str, ZooEntry] = {e.id: e for e in (*_paper_entries(), *_demo_entries())}


def get_entry(zoo_id: str) -> ZooEntry:
    """The entry of ``zoo_id``; an unknown id raises ``SureidError`` naming the close ones."""
    entry = ZOO.get(zoo_id)
    if entry is None:
        close = difflib.get_close_matches(zoo_id, list(ZOO), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise SureidError(f"unknown zoo id {zoo_id!r}; {hint}`sureid zoo` lists every id")
    return entry


# --------------------------------------------------------------------------------------------
# Where the demo's checkpoints are
# --------------------------------------------------------------------------------------------

# The demo's --out folder, when set: demo-* ids are looked for there and nowhere else.
DEMO_DIR_ENV = "SUREID_DEMO_DIR"


def demo_record_file() -> Path:
    """The file in which ``sureid demo`` records its output folder: ``demo.json`` in
    ``$SUREID_CACHE``, else ``$XDG_CACHE_HOME/sureid``, else ``~/.cache/sureid``."""
    import os

    folder = os.environ.get("SUREID_CACHE")
    if not folder:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = str(Path(cache) / "sureid")
    return Path(folder).expanduser() / "demo.json"


def record_demo_location(out_dir) -> Path | None:
    """Record ``out_dir`` (the demo's ``--out``, made absolute) in ``demo_record_file()``, so
    the ``demo-*`` zoo ids load its checkpoints from any folder. The demo calls this when it has
    written them. Returns the file written, or None when it cannot be written (a read-only home:
    the ids then resolve through ``$SUREID_DEMO_DIR`` or ``./sureid-demo`` only)."""
    import json
    import os
    from datetime import datetime, timezone

    target = demo_record_file()
    record = {
        "out_dir": str(Path(out_dir).expanduser().resolve()),
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(partial, target)
    except OSError:
        return None
    return target


def recorded_demo_dir() -> Path | None:
    """The output folder the last demo run recorded (None: none recorded, or unreadable)."""
    import json

    try:
        out_dir = json.loads(demo_record_file().read_text()).get("out_dir")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(out_dir) if isinstance(out_dir, str) and out_dir else None


def local_candidates(entry: ZooEntry) -> list[tuple[str, Path]]:
    """Where a ``local`` entry's checkpoint is looked for, in order: ``(how, folder)`` pairs.

    A demo entry (``local_path`` under ``sureid-demo/``): the folder ``$SUREID_DEMO_DIR`` names
    (only that one, when it is set), else the folder the last demo run recorded, then
    ``./sureid-demo``. Any other local entry: its ``local_path``, from the current folder.
    """
    import os

    if entry.local_path is None:
        return []
    prefix = f"{DEMO_OUT}/"
    if not entry.local_path.startswith(prefix):
        return [("the current folder", Path(entry.local_path))]
    inside = entry.local_path[len(prefix) :]
    env = os.environ.get(DEMO_DIR_ENV)
    if env:
        return [(f"${DEMO_DIR_ENV}", Path(env).expanduser() / inside)]
    found = []
    recorded = recorded_demo_dir()
    if recorded is not None:
        found.append((f"the last demo run (recorded in {demo_record_file()})", recorded / inside))
    found.append(("the current folder", Path(entry.local_path)))
    return found


def local_checkpoint(entry: ZooEntry) -> Path | None:
    """The first of ``local_candidates(entry)`` that holds a checkpoint (config.json)."""
    for _, folder in local_candidates(entry):
        if (folder / "config.json").is_file():
            return folder
    return None


def _shown(folder: Path) -> str:
    """``folder`` relative to the current folder when it lies in it, else absolute."""
    import os

    absolute = folder.expanduser().absolute()
    try:
        return os.path.relpath(absolute) if absolute.is_relative_to(Path.cwd()) else str(absolute)
    except ValueError:  # another drive
        return str(absolute)


def _where_looked(entry: ZooEntry) -> list[str]:
    """One line per place a local entry is looked for, and what is there."""
    import os

    lines = []
    if entry.local_path and entry.local_path.startswith(f"{DEMO_OUT}/"):
        if not os.environ.get(DEMO_DIR_ENV):
            lines.append(f"${DEMO_DIR_ENV}: not set")
            if recorded_demo_dir() is None:
                lines.append(f"the last demo run: none recorded in {demo_record_file()}")
    for how, folder in local_candidates(entry):
        built = "built" if (folder / "config.json").is_file() else "not built"
        lines.append(f"{how}: {folder.expanduser().absolute()} ({built})")
    return lines


def _status_cell(entry: ZooEntry) -> str:
    if entry.status == "published":
        return f"published: {entry.repo_id}@{entry.revision[:12]}"
    if entry.status == "local":
        found = local_checkpoint(entry)
        if found is None:
            return f"local: {entry.local_path} (not built)"
        return f"local: {_shown(found)} (built)"
    return "recipe"


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_zoo_table(entries=None) -> str:
    """The zoo as a markdown table (``sureid zoo``): '-' where the paper's number is not known."""
    rows = [
        "| id | kind | trained on | tested on | backbone | keep | paper R1 | paper mAP | "
        "paper img/s | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in ZOO.values() if entries is None else entries:
        rows.append(
            f"| {e.id} | {e.kind} | {dataset_title(e.dataset)} | {dataset_title(e.test_dataset)} "
            f"| {e.backbone} | {e.keep_rate:g} | {_number(e.paper_r1)} | {_number(e.paper_map)} "
            f"| {_number(e.paper_images_per_second, 0)} | {_status_cell(e)} |"
        )
    return "\n".join(rows)


def entry_commands(entry: ZooEntry, data_root: str | None = None) -> list[str]:
    """The entry's commands, with ``--data-root`` / ``--test-root`` set to ``data_root``."""
    if data_root is None:
        return list(entry.commands)
    out = []
    for command in entry.commands:
        tokens = shlex.split(command)
        for i, token in enumerate(tokens[:-1]):
            if token in ("--data-root", "--test-root"):
                tokens[i + 1] = str(data_root)
        out.append(shlex.join(tokens))
    return out


def format_entry(entry: ZooEntry, data_root: str | None = None) -> str:
    """``sureid zoo show ID``: the entry, then its commands ready to paste (comments start
    with ``#``)."""
    where = f"trained on {dataset_title(entry.dataset)}"
    if entry.test_dataset != entry.dataset:
        where += f", tested on {dataset_title(entry.test_dataset)}"
    kind = entry.kind if entry.keep_rate == 1.0 else f"{entry.kind}, keep rate {entry.keep_rate:g}"
    speed = _number(entry.paper_images_per_second, 0)
    if entry.paper_speed_setting:
        speed += f" ({entry.paper_speed_setting})"
    lines = [
        f"# {entry.id}: {entry.backbone} {kind}, {where}",
        f"# paper: R1 {_number(entry.paper_r1)}, mAP {_number(entry.paper_map)}, img/s {speed}",
        f"# status: {_status_cell(entry)}",
    ]
    if entry.teacher:
        lines.append(f"# teacher: {entry.teacher}")
    if entry.notes:
        lines.append(f"# {entry.notes}")
    if entry.status == "published":
        revision = f", revision={entry.revision!r}" if entry.revision else ""
        lines.append(f"# load: SureidModel.from_pretrained({entry.repo_id!r}{revision})")
    if entry.status == "local":
        lines.append("# looked for it in:")
        lines += [f"#   {line}" for line in _where_looked(entry)]
        lines.append(f"# load: SureidModel.from_pretrained({entry.id!r})")
    lines.append("")
    commands = entry_commands(entry, data_root)
    if data_root is None and any("/data" in c for c in commands):
        lines.append("# /data: the folder holding the data sets (docs/datasets.md; --data-root)")
    lines.extend(commands)
    out = entry.output_dir
    if out and entry.status != "local":
        lines += [
            "",
            f"# the card with the final metrics: {out}/README.md; publish it with",
            f"# sureid push --model {out} --repo-id ORG/{entry.id}",
        ]
    return "\n".join(lines)


def recipe_error(entry: ZooEntry) -> SureidError:
    """The error ``from_pretrained`` raises for an entry that has no checkpoint to load."""
    steps = "\n".join(f"  {c}" for c in entry.commands)
    if entry.status == "local":
        looked = "\n".join(f"  {line}" for line in _where_looked(entry))
        return SureidError(
            f"zoo entry {entry.id!r} is built locally by `{entry.commands[0]}` (into "
            f"{entry.local_path}), and no built copy was found; looked in\n{looked}\nRun\n"
            f"{steps}\n(it records where it wrote the checkpoints), set {DEMO_DIR_ENV} to the "
            "folder an earlier run wrote (its --out), or pass the checkpoint folder itself"
        )
    return SureidError(
        f"zoo entry {entry.id!r} is a recipe: no checkpoint is published yet. Train it with\n"
        f"{steps}\nthen load the folder: SureidModel.from_pretrained({entry.output_dir!r}) "
        f"(`sureid zoo show {entry.id}` prints these commands)"
    )


def resolve_zoo_id(name, kwargs: dict) -> tuple[object, dict]:
    """What ``from_pretrained`` loads for ``name``: a zoo id becomes its checkpoint.

    Anything that is not a zoo id (a path, ``org/name``), or a local folder of that name,
    passes unchanged. A published entry gives its ``repo_id``, with its ``revision`` unless
    ``kwargs`` name one; a local entry its folder when built (``local_checkpoint``: for the
    demo's, ``$SUREID_DEMO_DIR``, the folder the demo recorded, ``./sureid-demo``); otherwise
    ``recipe_error``.
    """
    if not isinstance(name, str) or name not in ZOO or Path(name).expanduser().exists():
        return name, kwargs
    entry = ZOO[name]
    if entry.status == "published":
        if entry.revision and kwargs.get("revision") is None:
            kwargs = {**kwargs, "revision": entry.revision}
        return entry.repo_id, kwargs
    if entry.status == "local":
        found = local_checkpoint(entry)
        if found is not None:
            return str(found), kwargs
    raise recipe_error(entry)


def register(entry: ZooEntry) -> None:
    """Add (or replace) ``entry`` in ``ZOO`` for this process, e.g. a checkpoint of your own
    published with ``sureid push``."""
    if not isinstance(entry, ZooEntry):
        raise TypeError(f"register takes a ZooEntry, got {type(entry).__name__}")
    ZOO[entry.id] = entry


def published(entry: ZooEntry, repo_id: str, revision: str) -> ZooEntry:
    """``entry`` as published at ``repo_id`` / ``revision`` (a copy; ``register`` it)."""
    return replace(entry, status="published", repo_id=repo_id, revision=revision)


# --------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------


def check_push_folder(model_dir) -> Path:
    """The folder ``sureid push`` may upload: SUREID config, weights and model card."""
    import json

    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise SureidError(
            f"{folder} is not a folder; pass the checkpoint folder (config.json, "
            "model.safetensors, README.md)"
        )
    config = folder / "config.json"
    if not config.is_file():
        raise SureidError(f"{folder} has no config.json: not a SUREID checkpoint folder")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, UnicodeDecodeError) as err:
        raise SureidError(f"{config} is not valid JSON ({err}): save the model again") from err
    if model_type not in ("sureid-teacher", "sureid-student"):
        raise SureidError(
            f"{folder}: config.json has model_type {model_type!r}, not a SUREID model"
        )
    if not any(folder.glob("*.safetensors")):
        raise SureidError(
            f"{folder} has no weights (model.safetensors): save the model with save_pretrained "
            "before pushing"
        )
    card = folder / "README.md"
    if not card.is_file() or not card.read_text().strip():
        raise SureidError(
            f"{folder} has no model card (README.md): training writes one (SureidTrainer, "
            "sureid demo), as does save_pretrained into a folder without one; or write it with "
            "sureid.model_card.build_model_card"
        )
    return folder


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` must be ``ORG/NAME`` as the Hub spells repo ids."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(repo_id)
    try:
        if text.count("/") != 1:
            raise HFValidationError("needs exactly one '/'")
        validate_repo_id(text)
    except HFValidationError as err:
        raise SureidError(
            f"repo id must be ORG/NAME (e.g. my-org/sureid-deit-occduke), got {text!r} "
            f"({' '.join(str(err).split())})"
        ) from err
    return text


def _network_errors() -> tuple[type[BaseException], ...]:
    """What reaching the Hub may raise: huggingface_hub's errors are OSErrors; the HTTP
    client's transport errors are not."""
    found: list[type[BaseException]] = [OSError]
    for module, name in (("httpx", "TransportError"), ("httpx2", "TransportError")):
        try:
            found.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _push_failure(err: BaseException, repo_id: str, folder: Path) -> SureidError:
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        why = "offline mode is on (HF_HUB_OFFLINE=1); unset it, with a network, to push"
    elif isinstance(err, LocalTokenNotFoundError):
        why = _NO_TOKEN
    elif isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        why = " ".join(str(err).split()[:40])
        if status in (401, 403):
            why = (
                f"the Hub refused the token (HTTP {status}): check HF_TOKEN or `hf auth login` "
                f"and that the token may write to {repo_id.split('/')[0]}"
            )
    else:
        why = (
            f"cannot reach the Hugging Face Hub ({type(err).__name__}: "
            f"{' '.join(str(err).split()[:30])}); check the network"
        )
    return SureidError(f"cannot push {folder} to {repo_id}: {why}")


_NO_TOKEN = (
    "no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (huggingface-cli login)"
)


def push_checkpoint(
    model_dir,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
):
    """Upload a checkpoint folder (weights, config, processor, model card) to the Hub.

    Creates the repo when missing (``HfApi.create_repo``; ``private`` for a new one), the
    branch ``revision`` when given, and uploads the folder with ``HfApi.upload_folder``,
    leaving out ``PUSH_IGNORE`` (training checkpoints, logs, pickles). The token comes from
    ``token``, else the usual places (``HF_TOKEN``, ``hf auth login``). Offline, without a token,
    or when the Hub refuses, raises a one-line ``SureidError``.

    Args:
        model_dir (`str` or `Path`): the folder: config.json, model.safetensors, README.md.
        repo_id (`str`): ``ORG/NAME``.
        private (`bool`, *optional*, defaults to `False`): create the repo private.
        revision (`str`, *optional*): a branch to upload to (created from main when missing);
            None: main.
        commit_message (`str`, *optional*): the commit's message.
        token (`str`, *optional*): a Hub token; None: the usual places.

    Returns: the ``CommitInfo`` of the upload (``commit_url``, ``oid``).

    Example:

    ```python
    >>> from sureid.zoo import push_checkpoint
    >>> info = push_checkpoint("runs/sureid-deit-occduke", "my-org/sureid-deit-occduke")  # doctest: +SKIP
    >>> info.oid  # the revision to load, or to record in the zoo  # doctest: +SKIP
    ```
    """
    import huggingface_hub
    from huggingface_hub import constants

    folder = check_push_folder(model_dir)
    repo_id = check_repo_id(repo_id)
    if constants.is_offline_mode():
        raise SureidError(
            f"cannot push {folder} to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); unset "
            "it, with a network, to push"
        )
    token = token or huggingface_hub.get_token()
    if not token:
        raise SureidError(f"cannot push {folder} to {repo_id}: {_NO_TOKEN}")
    api = huggingface_hub.HfApi(token=token)
    message = commit_message or f"Upload {folder.name} with sureid push"
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=message,
            ignore_patterns=list(PUSH_IGNORE),
        )
    except _network_errors() as err:
        raise _push_failure(err, repo_id, folder) from err


def suggest_zoo_ids(name: str) -> str:
    """The hint for a bare name that loads nothing: close zoo ids, or where the zoo is listed."""
    close = difflib.get_close_matches(name, list(ZOO), n=3)
    if close:
        return f" Did you mean {' or '.join(close)} (zoo ids; `sureid zoo` lists them)?"
    return " `sureid zoo` lists the zoo's ids."


# ``from_pretrained`` resolves zoo ids and suggests close ones (the model layer calls these
# hooks; it does not import this module).
register_checkpoint_hooks(resolve=resolve_zoo_id, suggest=suggest_zoo_ids)
