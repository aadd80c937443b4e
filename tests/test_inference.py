"""extract_features: input kinds, order, token dropping, bad inputs, devices; the HF pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sureid import (
    SureidError,
    SureidImageProcessor,
    SureidStudentModel,
    SureidTeacherConfig,
    SureidTeacherModel,
)
from sureid.inference import (
    FeatureResult,
    extract_features,
    resolve_autocast_dtype,
    resolve_device,
)

from .conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    sizes = [(80, 40), (64, 32), (100, 44), (70, 30), (90, 50)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def image_files(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("crops")
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i:04d}_c1_f{i:07d}.png")  # PNG: lossless, same pixels as PIL
        image.save(paths[-1])
    return paths


def _reference(model, images):
    processor = SureidImageProcessor.from_model_config(model.config)
    with torch.inference_mode():
        out = model.eval()(processor(images)["pixel_values"])
    return F.normalize(out.embeddings, dim=1), out.kept_indices


def test_features_are_normalised_in_input_order_and_batch_invariant(student, images):
    reference, _ = _reference(student, images)
    feats = extract_features(student, images, batch_size=2, device="cpu", progress=False)
    assert isinstance(feats, torch.Tensor) and feats.dtype == torch.float32
    assert feats.shape == (len(images), TINY["hidden_size"]) and feats.device.type == "cpu"
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(len(images)))
    torch.testing.assert_close(feats, reference, atol=1e-5, rtol=0)
    reversed_feats = extract_features(student, images[::-1], batch_size=3, progress=False)
    torch.testing.assert_close(reversed_feats, feats.flip(0), atol=1e-5, rtol=0)


def test_every_input_kind_gives_the_same_features(student, images, image_files):
    image = images[0]
    array = np.array(image)
    inputs = [
        image,
        array,
        torch.from_numpy(array.copy()).permute(2, 0, 1),
        image_files[0],
        str(image_files[0]),
    ]
    feats = extract_features(student, inputs, progress=False)
    for row in feats[1:]:
        torch.testing.assert_close(row, feats[0], atol=1e-5, rtol=0)


def test_every_pixel_type_of_one_image_gives_the_same_features(student, tmp_path):
    """uint8 0..255, float 0..1 (numpy HxWx3, torchvision CxHxW), uint16 and 16-bit PNGs."""
    rgb = np.random.default_rng(1).integers(0, 256, (64, 32, 3), dtype=np.uint8)
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    kinds = {
        "uint8 array": rgb,
        "float32 array in [0, 1]": rgb.astype(np.float32) / 255,
        "float64 array in [0, 1]": rgb / 255.0,
        "float tensor CxHxW in [0, 1]": chw.float() / 255,
        "uint16 array": rgb.astype(np.uint16) * 257,
    }
    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    kinds.update(
        {
            "8-bit gray PNG": tmp_path / "gray8.png",
            "16-bit gray PNG": tmp_path / "gray16.png",
            "I;16 PIL image": Image.open(tmp_path / "gray16.png"),
            "float gray in [0, 1]": gray / 255.0,
        }
    )
    feats = extract_features(student, list(kinds.values()), progress=False)
    names = list(kinds)
    for ref in ("uint8 array", "8-bit gray PNG"):
        i = names.index(ref)
        group = names[:5] if i == 0 else names[5:]
        for name in group:
            cosine = float(feats[i] @ feats[names.index(name)])
            assert cosine > 0.999, f"{name} vs {ref}: cosine {cosine}"
    # and not trivially: the RGB and the gray picture differ
    assert float(feats[0] @ feats[5]) < 0.99


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((64, 32, 3), 200.0, np.float32), r"float32 with values in \[200, 200\].*\[0, 1\]"),
        (torch.full((3, 64, 32), -2.1), r"float32 with values in \[-2.1, -2.1\].*mean/std"),
        (np.full((64, 32, 3), np.nan, np.float32), "NaN or infinite"),
        (np.full((64, 32), 4095 * 16, np.int32), r"int32 with values in \[65520, 65520\]"),
        (np.ones((64, 32, 3), bool), "dtype bool"),
    ],
)
def test_pixels_outside_their_types_range_raise_naming_the_input(student, image, message):
    with pytest.raises(SureidError, match=f"input 0: {type(image).__name__} of shape .*{message}"):
        extract_features(student, [image], progress=False)


def test_a_datasets_dataset_is_read_by_its_image_column(student, image_files):
    import datasets

    paths = [str(p) for p in image_files]
    expected = extract_features(student, paths, progress=False)
    with_path = datasets.Dataset.from_dict({"image": paths, "path": paths, "pid": [1] * 5})
    with_path = with_path.cast_column("image", datasets.Image())
    torch.testing.assert_close(extract_features(student, with_path, progress=False), expected)
    # another column name, images stored as bytes, no path column
    as_bytes = datasets.Dataset.from_dict({"crop": [Image.open(p) for p in paths]})
    assert isinstance(as_bytes.features["crop"], datasets.Image)
    torch.testing.assert_close(extract_features(student, as_bytes, progress=False), expected)
    # a missing file in a data set: named, and skippable
    broken = datasets.Dataset.from_dict({"image": [paths[0], paths[0] + ".gone.png"]})
    broken = broken.cast_column("image", datasets.Image())
    with pytest.raises(FileNotFoundError, match=r"input 1: .*\.gone\.png"):
        extract_features(student, broken, progress=False)
    result = extract_features(student, broken, on_error="skip", progress=False)
    assert result.skipped_indices == [1] and result.skipped[0].source.endswith(".gone.png")
    torch.testing.assert_close(result.features, expected[:1])
    with pytest.raises(SureidError, match="image column"):
        extract_features(student, datasets.Dataset.from_dict({"pid": [1, 2]}))


def test_the_student_really_drops_tokens_and_its_mode_is_restored(student, images):
    student.train()
    result = extract_features(student, images, batch_size=2, return_kept=True, progress=False)
    assert student.training  # restored
    student.eval()
    assert isinstance(result, FeatureResult) and result.skipped == []
    assert result.indices.tolist() == list(range(len(images)))
    counts = student.config.stage_keep_counts
    assert [k.shape for k in result.kept_indices] == [(len(images), k) for k in counts]
    _, reference_kept = _reference(student, images)
    n = student.config.num_patches
    for stage, (ours, ref) in enumerate(zip(result.kept_indices, reference_kept)):
        assert ours.min() >= 0 and ours.max() < n
        assert torch.equal(ours.sort(1).values, ref.sort(1).values)
        for row in ours:  # each stage keeps distinct patches, a subset of the previous stage
            assert len(set(row.tolist())) == counts[stage]
        if stage:
            previous = result.kept_indices[stage - 1]
            for row, prev in zip(ours, previous):
                assert set(row.tolist()) <= set(prev.tolist())
    assert result.num_inputs == len(images)


def test_throughput_counts_the_extracted_images():
    """6 features of 8 inputs (2 skipped) in 2 s: 3 images/s; no time measured: nan."""
    result = FeatureResult(
        features=torch.zeros(6, 4), indices=torch.arange(6), num_inputs=8, seconds=2.0
    )
    assert result.images_per_second == 3.0
    assert np.isnan(FeatureResult(torch.zeros(1, 4), torch.arange(1)).images_per_second)


def test_a_teacher_works_and_has_no_kept_tokens():
    teacher = SureidTeacherModel(SureidTeacherConfig(**TINY))
    result = extract_features(teacher, [np.zeros((64, 32, 3), np.uint8)], return_kept=True)
    assert result.features.shape == (1, TINY["hidden_size"]) and result.kept_indices is None


@pytest.fixture
def bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    return {"missing": tmp_path / "missing.jpg", "corrupt": corrupt, "text": text}


def test_bad_inputs_raise_errors_that_name_them(student, image_files, bad_files):
    good = [image_files[0]]
    with pytest.raises(FileNotFoundError, match=r"input 1: .*missing\.jpg.*on_error='skip'"):
        extract_features(student, good + [bad_files["missing"]], progress=False)
    with pytest.raises(SureidError, match=r"corrupt\.jpg"):
        extract_features(student, good + [bad_files["corrupt"]], progress=False)
    with pytest.raises(SureidError, match=r"notes\.txt"):
        extract_features(student, good + [bad_files["text"]], progress=False)
    with pytest.raises(SureidError, match="input 1: ndarray of shape"):
        extract_features(student, good + [np.zeros((2, 2, 2, 2))], progress=False)
    with pytest.raises(SureidError, match="cannot extract features from a int"):
        extract_features(student, 42)
    with pytest.raises(ValueError, match="on_error"):
        extract_features(student, good, on_error="ignore")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_skip_leaves_bad_inputs_out_and_lists_them(student, image_files, bad_files, num_workers):
    paths = [image_files[0], bad_files["missing"], image_files[1], bad_files["corrupt"]]
    paths += [image_files[2], bad_files["text"], image_files[3]]
    result = extract_features(
        student, paths, batch_size=2, on_error="skip", num_workers=num_workers, progress=False
    )
    assert result.num_inputs == 7 and result.skipped_indices == [1, 3, 5]
    assert [s.source for s in result.skipped] == [
        str(bad_files[k]) for k in ("missing", "corrupt", "text")
    ]
    assert "not found" in result.skipped[0].error
    assert result.indices.tolist() == [0, 2, 4, 6]
    expected = extract_features(student, image_files[:4], progress=False)
    torch.testing.assert_close(result.features, expected, atol=1e-5, rtol=0)


def test_all_inputs_skipped_gives_an_empty_result(student, bad_files):
    result = extract_features(student, [bad_files["missing"]], on_error="skip")
    assert result.features.shape == (0, TINY["hidden_size"]) and len(result.skipped) == 1


def test_no_non_finite_row_is_ever_returned(student, images, monkeypatch):
    broken = SureidStudentModel(student.config).eval()
    broken.load_state_dict(student.state_dict())
    with torch.no_grad():  # a diverged checkpoint: every weight NaN
        for p in broken.parameters():
            p.fill_(float("nan"))
    with pytest.raises(SureidError, match=r"input 0: PIL image .*NaN/inf embedding; .*not finite"):
        extract_features(broken, images[:2], progress=False)
    result = extract_features(broken, images[:2], on_error="skip", progress=False)
    assert result.features.shape == (0, TINY["hidden_size"]) and result.skipped_indices == [0, 1]
    # one input the model cannot embed: left out and listed, the others kept in order
    real_forward = student.forward

    def forward(pixel_values, **kwargs):
        out = real_forward(pixel_values=pixel_values, **kwargs)
        white = pixel_values.mean(dim=(1, 2, 3)) > 2.0  # normalised, white is about 2.4
        out.embeddings[white] = float("inf")
        return out

    monkeypatch.setattr(student, "forward", forward)
    white = np.full((64, 32, 3), 255, np.uint8)
    result = extract_features(
        student, [images[0], white, images[1]], on_error="skip", return_kept=True
    )
    assert result.indices.tolist() == [0, 2] and result.skipped_indices == [1]
    assert all(len(k) == 2 for k in result.kept_indices)
    assert torch.isfinite(result.features).all() and "weights are finite" in result.skipped[0].error


def test_progress_bar_only_on_longer_runs(student, capsys):
    blank = [np.zeros((64, 32, 3), np.uint8)] * 4
    extract_features(student, blank, batch_size=4)
    assert "extracting features" not in capsys.readouterr().err
    extract_features(student, blank, batch_size=1)  # 4 batches
    assert "extracting features" in capsys.readouterr().err
    extract_features(student, blank, batch_size=1, progress=False)
    assert "extracting features" not in capsys.readouterr().err


def test_device_and_precision_choice(monkeypatch):
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("gpu-please")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_autocast_dtype(cpu) is None  # float32 on the CPU
    assert resolve_autocast_dtype(cpu, "bf16") == torch.bfloat16
    assert resolve_autocast_dtype(cuda, torch.float32) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_autocast_dtype(cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_autocast_dtype(cuda) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        resolve_autocast_dtype(cpu, "int8")


def test_bf16_autocast_on_cpu_stays_close(student, images):
    full = extract_features(student, images, progress=False)
    half = extract_features(student, images, dtype="bf16", progress=False)
    assert half.dtype == torch.float32
    assert (full * half).sum(1).min() > 0.98  # cosine similarity


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_extraction_matches_cpu(student, images):
    cpu = extract_features(student, images, device="cpu", progress=False)
    gpu = extract_features(student, images, device="cuda", num_workers=2, progress=False)
    student.cpu()
    assert gpu.device.type == "cpu" and (cpu * gpu).sum(1).min() > 0.99


# --------------------------------------------------------------------------------------------
# transformers pipeline
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_student(student, tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline_model")
    student.save_pretrained(path)
    return path


def test_sureid_pipeline_gives_the_extract_features_embedding(saved_student, images, image_files):
    from transformers import pipeline

    import sureid  # noqa: F401  (registers the task)

    pipe = pipeline("sureid-feature-extraction", model=str(saved_student), device="cpu")
    expected = extract_features(str(saved_student), images, progress=False)
    out = pipe(images)
    assert isinstance(out, list) and len(out) == len(images) and len(out[0]) == 64
    torch.testing.assert_close(torch.tensor(out), expected, atol=1e-5, rtol=0)
    single = pipe(str(image_files[0]), return_tensors=True)
    assert single.shape == (64,)
    torch.testing.assert_close(single, expected[0], atol=1e-5, rtol=0)
    raw = pipe(images[0], return_tensors=True, normalize=False)
    torch.testing.assert_close(F.normalize(raw, dim=0), expected[0], atol=1e-5, rtol=0)
    batched = pipe(images, batch_size=2, return_tensors=True)
    torch.testing.assert_close(torch.stack(batched), expected, atol=1e-5, rtol=0)
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        pipe(str(saved_student / "nope.jpg"))


def test_stock_image_feature_extraction_task_also_loads(saved_student, images):
    """The stock task runs on a SUREID checkpoint and returns ``features`` (before the BNNeck)."""
    from transformers import pipeline

    pipe = pipeline("image-feature-extraction", model=str(saved_student), device="cpu")
    out = pipe(images[0], return_tensors=True)
    model = SureidStudentModel.from_pretrained(saved_student).eval()
    processor = SureidImageProcessor.from_model_config(model.config)
    with torch.inference_mode():
        features = model(processor(images[0])["pixel_values"]).features
    torch.testing.assert_close(out, features, atol=1e-5, rtol=0)
