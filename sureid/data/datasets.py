"""Parsers for the standard ReID data sets -> ``datasets.DatasetDict`` {train, query, gallery}.

Every loader reads the official release's folder and file names, so a downloaded archive can be
unpacked and used as is. Images are stored as paths and decoded lazily by ``datasets.Image``.
Conventions (as in torchreid and TransReID): train pids are relabelled to ``0..K-1``, query and
gallery keep the original ids, camera ids are zero-based (``c1`` -> 0).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, DatasetInfo, Features, Image, Value

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SYNTHETIC_META = "sureid_synthetic.json"

FEATURES = Features(
    {
        "image": Image(),
        "path": Value("string"),
        "pid": Value("int64"),
        "camid": Value("int64"),
    }
)
FEATURES_WITH_OCCLUSION = Features({**FEATURES, "occluded": Value("bool")})
# The synthetic set also knows each image's visible body and what its occluder covers: the
# paths of two black/white PNGs.
FEATURES_SYNTHETIC = Features(
    {
        **FEATURES_WITH_OCCLUSION,
        "body_mask_path": Value("string"),
        "occluder_mask_path": Value("string"),
    }
)
SYNTHETIC_MASKS = {"body_mask_path": "body_masks", "occluder_mask_path": "occluder_masks"}

_MARKET_RE = re.compile(r"^(-?\d+)_c(\d+)s\d+_\d+_\d+\.[A-Za-z]+$")
_DUKE_RE = re.compile(r"^(\d+)_c(\d+)_f\d+\.[A-Za-z]+$")
_PREFIX_RE = re.compile(r"^(\d+)")
_FOLDER_CAM_RE = re.compile(r"_c(\d+)")


@dataclass
class _Record:
    path: str
    pid: int
    camid: int
    occluded: bool | None = None


@dataclass
class _SplitScan:
    """What a scan of one split found: the records and what was left out (and why)."""

    records: list[_Record] = field(default_factory=list)
    junk: int = 0  # Market-1501 pid -1 images, left out by the protocol
    bad_names: list[str] = field(default_factory=list)  # only filled when strict=False
    non_images: int = 0  # files without an image extension (e.g. Thumbs.db)
    empty_folders: list[str] = field(default_factory=list)  # person folders without images


@dataclass(frozen=True)
class _Spec:
    """How a named data set looks on disk, the other names it goes by, how it is evaluated.

    ``protocol``: ``"market"`` (drop same-pid same-camera gallery entries) or ``"cross"``
    (query and gallery from different image sets, no camera filtering); see
    ``sureid.evaluation``.
    """

    folder_names: tuple[str, ...]
    split_dirs: dict[str, str]  # split -> sub-folder
    pattern_hint: str
    parse: Callable[..., _SplitScan]
    num_cameras: int | None = None
    url: str = ""
    has_occlusion: bool = False
    aliases: tuple[str, ...] = ()  # in normalised form: lower case, "_" for "-"
    protocol: str = "market"


def _image_files(directory: Path, scan: _SplitScan, recursive: bool = False) -> list[Path]:
    """Image files in ``directory`` (sorted); non-image files are counted, not returned."""
    entries = sorted(directory.rglob("*") if recursive else directory.iterdir())
    files = []
    for p in entries:
        if not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(p)
        else:
            scan.non_images += 1
            logger.debug("ignoring non-image file %s", p)
    return files


def _bad_name(scan: _SplitScan, path: Path, expected: str, strict: bool) -> None:
    if strict:
        raise ValueError(
            f"cannot parse the file name {path} : expected names like {expected}. Rename or move "
            "the file, or pass strict=False to skip (and count) such files."
        )
    scan.bad_names.append(str(path))


def _check_camera(path: Path, cam: int, num_cameras: int | None) -> int:
    if cam < 1 or (num_cameras is not None and cam > num_cameras):
        upper = f"c{num_cameras}" if num_cameras is not None else "c<N>"
        raise ValueError(
            f"camera c{cam} in {path} is out of range: this data set's cameras are c1..{upper}."
        )
    return cam - 1


def _parse_camera_files(
    directory: Path,
    regex: re.Pattern[str],
    expected: str,
    num_cameras: int | None,
    strict: bool,
    junk_pid: int | None = None,
) -> _SplitScan:
    """Market/Duke style: pid and camera in every file name of one flat folder."""
    scan = _SplitScan()
    for path in _image_files(directory, scan):
        m = regex.match(path.name)
        if m is None:
            _bad_name(scan, path, expected, strict)
            continue
        pid, cam = int(m.group(1)), int(m.group(2))
        if junk_pid is not None and pid == junk_pid:
            scan.junk += 1
            continue
        if pid < 0:
            raise ValueError(f"negative person id {pid} in {path}; expected a pid >= 0.")
        scan.records.append(_Record(str(path), pid, _check_camera(path, cam, num_cameras)))
    return scan


def _parse_market(directory: Path, split: str, strict: bool) -> _SplitScan:
    return _parse_camera_files(
        directory, _MARKET_RE, "0002_c1s1_000451_03.jpg", 6, strict, junk_pid=-1
    )


def _parse_duke(directory: Path, split: str, strict: bool) -> _SplitScan:
    return _parse_camera_files(directory, _DUKE_RE, "0005_c2_f0046985.jpg", 8, strict)


def _parse_occluded_reid(directory: Path, split: str, strict: bool) -> _SplitScan:
    """``<pid>/*.tif`` per person; queries (occluded) camera 0, gallery (whole body) camera 1."""
    scan = _SplitScan()
    camid, occluded = (0, True) if split == "query" else (1, False)
    for sub in sorted(directory.iterdir()):
        if not sub.is_dir():
            if sub.suffix.lower() in IMAGE_EXTENSIONS:
                _bad_name(scan, sub, "<pid>/<pid>_<n>.tif (one folder per person)", strict)
            else:
                scan.non_images += 1
            continue
        if not sub.name.isdigit():
            _bad_name(scan, sub, "person folders named by their numeric id, e.g. 001/", strict)
            continue
        pid = int(sub.name)
        files = _image_files(sub, scan)
        if not files:
            scan.empty_folders.append(str(sub))
        for path in files:
            scan.records.append(_Record(str(path), pid, camid, occluded))
    return scan


def _parse_partial_reid(directory: Path, split: str, strict: bool) -> _SplitScan:
    """Flat folder, pid from the numeric file-name prefix; query camera 0, gallery camera 1."""
    scan = _SplitScan()
    camid, occluded = (0, True) if split == "query" else (1, False)
    for path in _image_files(directory, scan):
        m = _PREFIX_RE.match(path.name)
        if m is None:
            _bad_name(scan, path, "001_01.jpg (numeric person id prefix)", strict)
            continue
        scan.records.append(_Record(str(path), int(m.group(1)), camid, occluded))
    return scan


def _parse_folder(directory: Path, split: str, strict: bool) -> _SplitScan:
    """``<pid>/<image>``; camid from ``_c<N>`` in the name (N >= 1), else 0 (gallery: 1)."""
    scan = _SplitScan()
    default_cam = 1 if split == "gallery" else 0
    for sub in sorted(directory.iterdir()):
        if not sub.is_dir():
            if sub.suffix.lower() in IMAGE_EXTENSIONS:
                _bad_name(scan, sub, f"{split}/<pid>/<image> (one folder per person)", strict)
            else:
                scan.non_images += 1
            continue
        if not sub.name.isdigit():
            _bad_name(scan, sub, "person folders named by a non-negative integer id", strict)
            continue
        pid = int(sub.name)
        files = _image_files(sub, scan, recursive=True)
        if not files:
            scan.empty_folders.append(str(sub))
        for path in files:
            m = _FOLDER_CAM_RE.search(path.stem)
            camid = _check_camera(path, int(m.group(1)), None) if m else default_cam
            scan.records.append(_Record(str(path), pid, camid))
    return scan


_STANDARD_SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

SPECS: dict[str, _Spec] = {
    "market1501": _Spec(
        ("Market-1501-v15.09.15", "Market-1501", "market1501"),
        _STANDARD_SPLITS,
        "0002_c1s1_000451_03.jpg",
        _parse_market,
        num_cameras=6,
        url="http://www.liangzheng.org/Project/project_reid.html",
        aliases=("market", "market_1501"),
    ),
    "dukemtmc": _Spec(
        ("DukeMTMC-reID",),
        _STANDARD_SPLITS,
        "0005_c2_f0046985.jpg",
        _parse_duke,
        num_cameras=8,
        url="https://github.com/layumi/DukeMTMC-reID_evaluation",
        aliases=("duke", "dukemtmc_reid"),
    ),
    "occluded_duke": _Spec(
        ("Occluded_Duke",),
        _STANDARD_SPLITS,
        "0005_c2_f0046985.jpg",
        _parse_duke,
        num_cameras=8,
        url="https://github.com/lightas/Occluded-DukeMTMC-Dataset",
    ),
    "occluded_reid": _Spec(
        ("Occluded_REID", "OccludedREID"),
        {"query": "occluded_body_images", "gallery": "whole_body_images"},
        "<pid>/<pid>_<n>.tif",
        _parse_occluded_reid,
        url="https://github.com/tinajia2012/ICME2018_Occluded-Person-Reidentification_datasets",
        has_occlusion=True,
        protocol="cross",
    ),
    "partial_reid": _Spec(
        ("Partial_REID", "Partial-REID", "PartialREID"),
        {"query": "partial_body_images", "gallery": "whole_body_images"},
        "001_01.jpg",
        _parse_partial_reid,
        url="https://github.com/lingxiao-he/Partial-Person-ReID",
        has_occlusion=True,
        protocol="cross",
    ),
    "folder": _Spec(
        (),
        {"train": "train", "query": "query", "gallery": "gallery"},
        "<pid>/<name>[_c<N>].jpg",
        _parse_folder,
    ),
    "synthetic": _Spec(
        ("SUREID_Synthetic",),
        _STANDARD_SPLITS,
        "0005_c2_f0046985.jpg",
        _parse_duke,
        num_cameras=8,
        has_occlusion=True,
    ),
}
DATASET_NAMES: tuple[str, ...] = tuple(SPECS)


def canonical_dataset_name(name: str) -> str:
    """The ``SPECS`` key a data set name or alias stands for (``"DukeMTMC-reID"`` -> ``dukemtmc``).

    Case does not matter and ``-`` equals ``_``. Every function that takes a data set name
    (``load_reid_dataset``, ``sureid.evaluation.protocol_for_dataset``) goes through this one.
    """
    key = name.lower().replace("-", "_")
    for canonical, spec in SPECS.items():
        if key == canonical or key in spec.aliases:
            return canonical
    aliases = ", ".join(a for spec in SPECS.values() for a in spec.aliases)
    raise ValueError(
        f"unknown data set name {name!r}; expected one of: {', '.join(DATASET_NAMES)} "
        f"(or an alias: {aliases})."
    )


def _resolve_root(name: str, spec: _Spec, root: Path) -> Path:
    """The data set's own folder: ``root/<official folder name>`` or ``root`` itself."""
    if not root.exists():
        raise FileNotFoundError(
            f"data root {root} does not exist; pass the folder that contains "
            f"{_where(spec)} (see docs/datasets.md)."
        )
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} is a file; expected a folder.")
    for folder in spec.folder_names:
        if (root / folder).is_dir():
            return root / folder
    if any((root / sub).is_dir() for sub in spec.split_dirs.values()):
        return root
    expected = ", ".join(f"{s}/" for s in spec.split_dirs.values())
    source = f" (download: {spec.url})" if spec.url else ""
    raise FileNotFoundError(
        f"{name!r}: found neither {_where(spec)} in {root} nor its split folders ({expected}) "
        f"directly in {root}. Unpack the official release there{source}; see docs/datasets.md."
    )


def _where(spec: _Spec) -> str:
    if not spec.folder_names:
        return "train/, query/ and gallery/"
    return " or ".join(f"{f}/" for f in spec.folder_names)


def _check_layout(
    name: str, spec: _Spec, folder: Path, splits: tuple[str, ...] | None = None
) -> None:
    """Raise if a split folder the layout needs is missing (``folder``: train or query+gallery).

    ``splits``: only these are needed (the caller asked for them alone).
    """
    present = {s for s, sub in spec.split_dirs.items() if (folder / sub).is_dir()}
    if splits is not None:
        missing = [s for s in splits if s not in present]
    elif name == "folder":
        if "train" in present or {"query", "gallery"} <= present:
            return
        missing = ["train"] if not present else sorted({"query", "gallery"} - present)
    else:
        missing = [s for s in spec.split_dirs if s not in present]
    if missing:
        layout = ", ".join(f"{sub}/" for sub in spec.split_dirs.values())
        raise FileNotFoundError(
            f"{name!r}: expected the {' and '.join(missing)} folder(s) "
            f"{', '.join(str(folder / spec.split_dirs[s]) for s in missing)} "
            f"(layout: {layout} under {folder}); see docs/datasets.md."
        )


def _relabel(records: list[_Record]) -> tuple[list[_Record], dict[int, int]]:
    mapping = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [_Record(r.path, mapping[r.pid], r.camid, r.occluded) for r in records], mapping


def _read_synthetic_flags(folder: Path) -> dict[str, bool]:
    meta_path = folder / SYNTHETIC_META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} is missing: the 'synthetic' loader reads occlusion flags from it. "
            "Create the set with sureid.data.make_synthetic_reid(root), or load this folder "
            "as 'occluded_duke' (no occlusion column)."
        )
    with open(meta_path) as f:
        return {k: bool(v) for k, v in json.load(f)["occluded"].items()}


def _mask_path(folder: Path, mask_dir: str, sub: str, image_path: str) -> str:
    """A synthetic image's mask PNG in ``mask_dir`` (visible body or occluder); a clear error
    when the set predates that kind of mask."""
    path = folder / mask_dir / sub / (Path(image_path).stem + ".png")
    if not path.is_file():
        kind = "visible-body" if mask_dir == SYNTHETIC_MASKS["body_mask_path"] else "occluder"
        raise FileNotFoundError(
            f"{path} is missing: this synthetic set was made by an older version (no {kind} "
            "masks). Regenerate it with make_synthetic_reid(root, overwrite=True): the same "
            "parameters draw the same images."
        )
    return str(path)


def load_reid_dataset(
    name: str,
    root: str | Path,
    *,
    strict: bool = True,
    relabel_train: bool = True,
    splits: Iterable[str] | None = None,
) -> DatasetDict:
    """Load a ReID data set as ``DatasetDict`` {train, query, gallery} from its official layout.

    ``root`` is the folder holding the unpacked release (e.g. ``root/Market-1501-v15.09.15``)
    or the release folder itself. Test-only sets (``occluded_reid``, ``partial_reid``) have just
    query and gallery: train on another set with a second call (the paper's cross-domain setup).
    Image files whose names do not parse raise a ``ValueError`` unless ``strict=False``, in
    which case they are left out, counted in ``summary()`` and logged. Person folders without
    images (``folder``, ``occluded_reid`` layouts) are counted, logged and listed by
    ``summary()``. ``splits`` (e.g. ``("gallery",)``) reads only those splits, so a problem in
    another split's folder does not stop the one asked for.
    """
    key = canonical_dataset_name(name)
    spec = SPECS[key]
    splits = _requested_splits(key, spec, splits)
    folder = _resolve_root(key, spec, Path(root).expanduser())
    _check_layout(key, spec, folder, splits)
    flags = _read_synthetic_flags(folder) if key == "synthetic" else None
    loaded: dict[str, Dataset] = {}
    for split, sub in spec.split_dirs.items():
        directory = folder / sub
        if splits is not None and split not in splits:
            continue
        if not directory.is_dir():  # optional split of the generic folder layout
            continue
        scan = _scan_split(key, spec, directory, split, strict)
        records = scan.records
        if flags is not None:
            _set_occlusion_flags(records, flags, folder, sub)
        if split == "train" and relabel_train:
            records, _ = _relabel(records)
        loaded[split] = _split_dataset(key, spec, folder, sub, split, scan, records)
    return DatasetDict(loaded)


def _requested_splits(
    key: str, spec: _Spec, splits: Iterable[str] | None
) -> tuple[str, ...] | None:
    """``splits`` as a tuple (None: all), each one a split this data set has."""
    if splits is None:
        return None
    splits = tuple(splits)
    unknown = [s for s in splits if s not in spec.split_dirs]
    if unknown or not splits:
        raise ValueError(
            f"{key!r} has the splits {list(spec.split_dirs)}; cannot load {list(splits)}"
        )
    return splits


def _scan_split(key: str, spec: _Spec, directory: Path, split: str, strict: bool) -> _SplitScan:
    """Parse one split's folder; log what was left out (bad names, non-images, empty folders)."""
    scan = spec.parse(directory, split, strict)
    if not scan.records:
        raise ValueError(
            f"{key!r}: no images found in {directory}; expected files like {spec.pattern_hint}."
        )
    if scan.bad_names:
        logger.warning(
            "%s/%s: left out %d files whose names do not parse (first: %s)",
            key,
            split,
            len(scan.bad_names),
            scan.bad_names[0],
        )
    if scan.non_images:
        logger.info("%s/%s: ignored %d non-image files", key, split, scan.non_images)
    if scan.empty_folders:
        logger.warning(
            "%s/%s: %d person folders have no images (first: %s); those ids have no images "
            "in this split",
            key,
            split,
            len(scan.empty_folders),
            scan.empty_folders[0],
        )
    return scan


def _set_occlusion_flags(
    records: list[_Record], flags: dict[str, bool], folder: Path, sub: str
) -> None:
    """Each synthetic image's occlusion flag from the set's metadata file (every image listed)."""
    for r in records:
        rel = f"{sub}/{Path(r.path).name}"
        if rel not in flags:
            raise ValueError(
                f"{r.path} is not listed in {folder / SYNTHETIC_META}; regenerate the set "
                "with make_synthetic_reid(root, overwrite=True)."
            )
        r.occluded = flags[rel]


def _split_dataset(
    key: str,
    spec: _Spec,
    folder: Path,
    sub: str,
    split: str,
    scan: _SplitScan,
    records: list[_Record],
) -> Dataset:
    """One split as a ``Dataset``: image / path / pid / camid columns (plus ``occluded``,
    ``body_mask_path`` and ``occluder_mask_path`` where the set has them), the scan's notes in
    its info description."""
    if key == "synthetic":
        features = FEATURES_SYNTHETIC
    else:
        features = FEATURES_WITH_OCCLUSION if spec.has_occlusion else FEATURES
    notes = {
        "dataset": key,
        "split": split,
        "folder": str(folder / sub),
        "junk_left_out": scan.junk,
        "bad_names_left_out": len(scan.bad_names),
        "non_image_files_ignored": scan.non_images,
        "empty_person_folders": scan.empty_folders,
    }
    columns: dict[str, list] = {
        "image": [r.path for r in records],
        "path": [r.path for r in records],
        "pid": [r.pid for r in records],
        "camid": [r.camid for r in records],
    }
    if spec.has_occlusion:
        columns["occluded"] = [bool(r.occluded) for r in records]
    if key == "synthetic":
        for column, mask_dir in SYNTHETIC_MASKS.items():
            columns[column] = [_mask_path(folder, mask_dir, sub, r.path) for r in records]
    info = DatasetInfo(description=json.dumps(notes), dataset_name=key, features=features)
    return Dataset.from_dict(columns, features=features, info=info, split=split)


def _notes(ds: Dataset) -> dict:
    try:
        return json.loads(ds.info.description or "{}")
    except (json.JSONDecodeError, TypeError):
        return {}


def _column(ds: Dataset, name: str) -> np.ndarray:
    """One column as an array, without decoding images (and honouring select()/shuffle())."""
    return np.asarray(ds.with_format("numpy", columns=[name])[name])


def summary(data: DatasetDict | Dataset, *, print_table: bool = True) -> str:
    """Print (and return) ids / images / cameras per split, plus what the loader left out."""
    splits: Iterable[tuple[str, Dataset]]
    if isinstance(data, Dataset):
        splits = [(str(data.split or "data"), data)]
    else:
        splits = list(data.items())
    header = f"{'split':<8} {'ids':>6} {'images':>7} {'cameras':>7} {'occluded':>8}"
    lines = [header]
    remarks = []
    name = ""
    for split, ds in splits:
        pids, cams = _column(ds, "pid"), _column(ds, "camid")
        occ = str(int(_column(ds, "occluded").sum())) if "occluded" in ds.column_names else "-"
        lines.append(
            f"{split:<8} {len(np.unique(pids)):>6} {len(pids):>7} {len(np.unique(cams)):>7} "
            f"{occ:>8}"
        )
        notes = _notes(ds)
        name = name or notes.get("dataset", "")
        if notes.get("junk_left_out"):
            remarks.append(f"{split}: {notes['junk_left_out']} junk images (pid -1) left out")
        if notes.get("bad_names_left_out"):
            remarks.append(
                f"{split}: {notes['bad_names_left_out']} files with unparsable names left out"
            )
        if notes.get("non_image_files_ignored"):
            remarks.append(f"{split}: {notes['non_image_files_ignored']} non-image files ignored")
        empty = notes.get("empty_person_folders")
        if empty:
            names = ", ".join(Path(p).name for p in empty[:5]) + (", ..." if len(empty) > 5 else "")
            remarks.append(f"{split}: {len(empty)} person folders without images ({names})")
        if notes.get("dataset") == "market1501" and split == "gallery" and (pids == 0).any():
            remarks.append(f"gallery: {int((pids == 0).sum())} distractor images (pid 0)")
    title = f"{name}\n" if name else ""
    text = title + "\n".join(lines + remarks)
    if print_table:
        print(text)
    return text
