"""NODA: occluder bank, paste geometry (the paper's rules), collators."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from sureid.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OCCLUDER_KINDS,
    NodaCollator,
    NodaPaste,
    OccluderBank,
    Placement,
    ReidCollator,
    build_eval_collator,
    build_eval_transform,
    build_train_collator,
    occluder_placement,
)

H, W = 256, 128


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- geometry -------------------------------------------------------------------------------


def test_tall_occluder_is_vertical_full_height_third_to_half_width_at_a_side() -> None:
    g, sides = gen(), set()
    for _ in range(300):
        p = occluder_placement(90, 30, H, W, generator=g)  # aspect 3 > 2
        assert p.vertical and p.height == H and p.top == 0
        assert W / 3 <= p.width <= W / 2
        assert p.side in ("left", "right")
        assert p.left == (0 if p.side == "left" else W - p.width)
        sides.add(p.side)
    assert sides == {"left", "right"}


def test_other_occluders_are_horizontal_full_width_third_to_half_height_top_or_bottom() -> None:
    g, sides, heights = gen(), set(), set()
    for aspect_hw in [(60, 30), (20, 100), (10, 10)]:  # aspect exactly 2 is still horizontal
        for _ in range(200):
            p = occluder_placement(*aspect_hw, H, W, generator=g)
            assert not p.vertical and p.width == W and p.left == 0
            assert H / 3 <= p.height <= H / 2
            assert p.top == (0 if p.side == "top" else H - p.height)
            sides.add(p.side)
            heights.add(p.height)
    assert sides == {"top", "bottom"}
    assert min(heights) <= H / 3 + 3 and max(heights) >= H / 2 - 3  # spans the range


def test_geometry_at_small_sizes_stays_in_range() -> None:
    g = gen(1)
    for _ in range(100):
        v = occluder_placement(50, 5, 64, 32, generator=g)
        assert 32 / 3 <= v.width <= 16 and v.height == 64
        h = occluder_placement(5, 50, 64, 32, generator=g)
        assert 64 / 3 <= h.height <= 32 and h.width == 32


# ---- the paste ------------------------------------------------------------------------------


def _opaque(h: int, w: int, colour=(255, 255, 255)) -> Image.Image:
    return Image.new("RGBA", (w, h), colour + (255,))


def test_paste_changes_only_the_placement_box() -> None:
    bank = OccluderBank([_opaque(120, 20)])  # a pole: vertical
    paste = NodaPaste(bank, jitter=0.0, crop=(1.0, 1.0))
    image = torch.zeros(3, H, W)
    out, p = paste.apply(image, gen())
    assert p.vertical and p.height == H
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[p.top : p.top + p.height, p.left : p.left + p.width] = True
    assert torch.all(out[:, ~mask] == 0)
    assert torch.allclose(out[:, mask], torch.ones(1))
    assert torch.all(image == 0)  # input untouched


def test_paste_reports_what_the_occluder_covers() -> None:
    """Placement.coverage / mask: True on the opaque part of the occluder, nowhere else."""
    occ = Image.new("RGBA", (40, 20), (255, 0, 0, 0))  # horizontal, transparent left half
    occ.paste((255, 0, 0, 255), (20, 0, 40, 20))
    paste = NodaPaste(OccluderBank([occ]), jitter=0.0, flip_p=0.0, crop=(1.0, 1.0))
    out, p = paste.apply(torch.zeros(3, H, W), gen())
    mask = p.mask(H, W)
    assert p.coverage.shape == (p.height, p.width) and mask.shape == (H, W)
    assert not mask[: p.top].any() and not mask[p.top + p.height :].any()
    assert mask[p.top : p.top + p.height, W // 2 + 4 :].all()  # opaque half
    assert not mask[:, : W // 2 - 4].any()  # transparent half
    assert torch.equal(mask, out[0] > 0.5)  # exactly where the red went over one half
    no_coverage = Placement(2, 0, 3, W, "top", False)  # built by hand: the whole box
    assert no_coverage.mask(H, W).sum() == 3 * W


def test_paste_honours_alpha() -> None:
    occ = Image.new("RGBA", (40, 20), (255, 0, 0, 0))  # horizontal, transparent left half
    occ.paste((255, 0, 0, 255), (20, 0, 40, 20))
    paste = NodaPaste(OccluderBank([occ]), jitter=0.0, flip_p=0.0, crop=(1.0, 1.0))
    out, p = paste.apply(torch.zeros(3, H, W), gen())
    box = out[:, p.top : p.top + p.height]
    assert torch.all(box[:, :, : W // 2 - 4] == 0)  # transparent part: image unchanged
    assert torch.allclose(box[0, :, W // 2 + 4 :], torch.ones(1))  # opaque part: red
    assert torch.all(box[1:, :, W // 2 + 4 :] == 0)


def test_paste_in_normalised_space_and_uint8_and_pil() -> None:
    bank = OccluderBank([_opaque(20, 40)])
    paste = NodaPaste(bank, jitter=0.0, crop=(1.0, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    out, p = paste.apply(torch.zeros(3, H, W), gen())
    white = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    patch = out[:, p.top : p.top + p.height, p.left : p.left + p.width]
    assert torch.allclose(patch, white.view(3, 1, 1).expand_as(patch), atol=1e-5)
    raw = NodaPaste(bank, jitter=0.0, crop=(1.0, 1.0))
    u8, p8 = raw.apply(torch.zeros(3, H, W, dtype=torch.uint8), gen())
    assert u8.dtype == torch.uint8
    assert int(u8[:, p8.top : p8.top + p8.height].min()) == 255
    pil, _ = raw.apply(Image.new("RGB", (W, H)), gen())
    assert isinstance(pil, Image.Image) and pil.size == (W, H)


def test_paste_is_deterministic_under_a_seed() -> None:
    paste = NodaPaste(OccluderBank.builtin(num=9))
    image = torch.rand(3, 64, 32, generator=gen(9))
    a, pa = paste.apply(image, gen(5))
    b, pb = paste.apply(image, gen(5))
    assert pa == pb and torch.equal(a, b)
    c, _ = paste.apply(image, gen(6))
    assert not torch.equal(a, c)


def test_jitter_flip_crop_are_applied_to_the_occluder() -> None:
    occ = torch.zeros(4, 10, 20, dtype=torch.uint8)
    occ[0, :, :10] = 200  # left half red, right half black
    occ[3] = 255
    paste = NodaPaste(OccluderBank([occ]), jitter=0.0, flip_p=1.0, crop=(1.0, 1.0))
    prepared = paste.prepare(0, gen())
    assert prepared[0, :, :10].max() == 0 and prepared[0, :, 10:].min() > 0.7  # flipped
    cropper = NodaPaste(OccluderBank([occ]), jitter=0.0, flip_p=0.0, crop=(0.5, 0.5))
    assert cropper.prepare(0, gen()).shape == (4, 5, 10)
    jittered = NodaPaste(OccluderBank([occ]), jitter=0.5, flip_p=0.0, crop=(1.0, 1.0))
    outs = {round(float(jittered.prepare(0, gen(s))[0, 0, 0]), 4) for s in range(5)}
    assert len(outs) > 1


# ---- occluder banks -------------------------------------------------------------------------


def test_bank_from_folder_keeps_alpha(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (30, 90), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 15, 90))
    rgba.save(tmp_path / "pole.png")
    Image.new("RGB", (50, 20), (0, 255, 0)).save(tmp_path / "bush.jpg")
    bank = OccluderBank.from_folder(tmp_path)
    assert len(bank) == 2
    pole = bank[bank.names.index(str(tmp_path / "pole.png"))]
    assert pole.shape == (4, 90, 30) and pole.dtype == torch.uint8
    assert pole[3, :, :15].min() == 255 and pole[3, :, 15:].max() == 0
    bush = bank[bank.names.index(str(tmp_path / "bush.jpg"))]
    assert bush[3].min() == 255


def test_bank_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        OccluderBank.from_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable occluder images"):
        OccluderBank.from_folder(tmp_path / "empty")
    Image.new("RGB", (10, 10)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="broken.png"):
        OccluderBank.from_folder(tmp_path)
    assert len(OccluderBank.from_folder(tmp_path, skip_unreadable=True)) == 1
    with pytest.raises(ValueError, match="empty"):
        OccluderBank([])
    with pytest.raises(ValueError, match="fully transparent"):
        OccluderBank([Image.new("RGBA", (5, 5), (0, 0, 0, 0))])


def test_builtin_bank_has_every_kind_with_alpha_and_is_deterministic() -> None:
    bank = OccluderBank.builtin(num=2 * len(OCCLUDER_KINDS), seed=0)
    kinds = {name.split("/")[1].rsplit("_", 1)[0] for name in bank.names}
    assert kinds == set(OCCLUDER_KINDS)
    aspects = [t.shape[1] / t.shape[2] for t in bank.images]
    assert any(a > 2 for a in aspects) and any(a <= 2 for a in aspects)  # both NODA branches
    for name, t in zip(bank.names, bank.images, strict=True):
        assert t[3].max() == 255
        assert t[3].min() == 0 or "box" in name  # cut-outs: all but the boxes have transparency
    again = OccluderBank.builtin(num=2 * len(OCCLUDER_KINDS), seed=0)
    other = OccluderBank.builtin(num=2 * len(OCCLUDER_KINDS), seed=1)
    assert all(torch.equal(a, b) for a, b in zip(bank.images, again.images, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(bank.images, other.images, strict=True))


def test_bank_borrowed_from_dataset_images() -> None:
    images = [Image.new("RGB", (64, 128), (i * 40, 0, 0)) for i in range(4)]
    bank = OccluderBank.from_dataset([{"image": im} for im in images], num=20, seed=0)
    assert len(bank) == 20
    for t in bank.images:
        h, w = t.shape[1:]
        assert (w == 64 and 32 <= h <= 64) or (h == 128 and 16 <= w <= 22)
        assert t[3].min() == 255


# ---- collators ------------------------------------------------------------------------------


def samples(n: int = 4) -> list[dict]:
    return [
        {"image": Image.new("RGB", (40, 80), (30 * i, 100, 50)), "pid": 10 + i, "camid": i % 3}
        for i in range(n)
    ]


def test_noda_collator_doubles_the_batch() -> None:
    collate = build_train_collator((64, 32), noda=True, occluders=OccluderBank.builtin(num=9))
    out = collate(samples(4))
    assert set(out) == {"pixel_values", "labels", "camids", "occluded"}  # no occlusion_masks
    assert out["pixel_values"].shape == (8, 3, 64, 32)
    assert out["labels"].tolist() == [10, 11, 12, 13] * 2
    assert out["camids"].tolist() == [0, 1, 2, 0] * 2
    assert out["occluded"].dtype == torch.bool
    assert out["occluded"].tolist() == [False] * 4 + [True] * 4


def test_plain_collators_keep_b_rows() -> None:
    for collate in (build_train_collator((64, 32), noda=False), build_eval_collator((64, 32))):
        out = collate(samples(3))
        assert out["pixel_values"].shape == (3, 3, 64, 32)
        assert out["labels"].tolist() == [10, 11, 12]
        assert out["camids"].tolist() == [0, 1, 2]
        assert out["occluded"].tolist() == [False] * 3


def test_paired_copy_differs_only_by_a_border_occluder() -> None:
    """Deterministic transform + paired: copy 2 = copy 1 plus an occluder flush with an edge,
    and it differs from copy 1 only where the occluder was pasted."""
    collate = NodaCollator(build_eval_transform((64, 32)), OccluderBank.builtin(num=9), paired=True)
    for seed in range(5):
        torch.manual_seed(seed)
        out = collate(samples(2))
        assert "occlusion_masks" not in out
        x1, x2 = out["pixel_values"][:2], out["pixel_values"][2:]
        # The transform draws nothing, so the same seed replays the collator's pastes on copy 1:
        # copy 2 is exactly those pastes, and where each occluder went is its placement.
        torch.manual_seed(seed)
        replayed = [collate.paste.apply(a) for a in x1]
        for a, b, (pasted, placement) in zip(x1, x2, replayed, strict=True):
            assert torch.equal(b, pasted)
            diff = (a - b).abs().sum(0) > 1e-6
            assert diff.any()
            box = torch.zeros(64, 32, dtype=torch.bool)
            box[
                placement.top : placement.top + placement.height,
                placement.left : placement.left + placement.width,
            ] = True
            assert not (diff & ~box).any()  # nothing changed outside the pasted box
            assert (diff & placement.mask(64, 32)).any()  # and it changed where it covers
            rows, cols = diff.any(1).nonzero().flatten(), diff.any(0).nonzero().flatten()
            assert rows.min() == 0 or rows.max() == 63 or cols.min() == 0 or cols.max() == 31
            # ... and inside one of the four boxes NODA may fill at 64x32: at most H/2 = 32 rows
            # at the top or the bottom, or at most W/2 = 16 columns at the left or the right.
            top, bottom = rows.max() <= 31, rows.min() >= 64 - 32
            left, right = cols.max() <= 15, cols.min() >= 32 - 16
            assert top or bottom or left or right, (rows.tolist(), cols.tolist())


def test_collators_are_picklable_and_reject_bad_samples() -> None:
    collate = build_train_collator((64, 32), noda=True, occluders=OccluderBank.builtin(num=9))
    clone = pickle.loads(pickle.dumps(collate))
    assert clone(samples(2))["pixel_values"].shape == (4, 3, 64, 32)
    with pytest.raises(ValueError, match="'pid'"):
        ReidCollator(build_eval_transform((64, 32)))([{"image": Image.new("RGB", (8, 8))}])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_noda_collator_in_a_dataloader_worker() -> None:
    from torch.utils.data import DataLoader

    collate = build_train_collator((32, 16), noda=True, occluders=OccluderBank.builtin(num=9))
    loader = DataLoader(samples(4), batch_size=2, collate_fn=collate, num_workers=1)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["pixel_values"].shape == (4, 3, 32, 16)
