"""Importing timm ViT/DeiT weights: parity with timm, pos-embed resampling, checkpoint files, errors."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from sureid import SureidError, SureidModel, SureidStudentModel, SureidTeacherModel
from sureid.cli import main


@pytest.mark.parametrize(
    ("name", "cls", "prefix"),
    [
        ("deit_small_patch16_224", SureidStudentModel, 1),
        ("deit_small_distilled_patch16_224", SureidStudentModel, 2),
        ("vit_base_patch16_224", SureidTeacherModel, 1),
    ],
)
def test_features_match_timm_forward_features(name, cls, prefix):
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, img_size=(256, 128)).eval()
    overrides = {"keep_rate": 1.0} if cls is SureidStudentModel else {}
    model = cls.from_timm(name, checkpoint=reference, **overrides).eval()
    assert model.config.num_prefix_tokens == prefix
    assert model.config.hidden_size == reference.embed_dim
    x = torch.randn(2, 3, 256, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.forward_features(x)[:, 0]
        got = model(x).features
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_imagenet_checkpoint_is_resampled_to_the_reid_grid(tmp_path):
    torch.manual_seed(0)
    imagenet = timm.create_model("deit_small_distilled_patch16_224", pretrained=False)
    state = imagenet.state_dict()
    expected_pos = resample_abs_pos_embed(
        state["pos_embed"],
        new_size=[16, 8],
        old_size=[14, 14],
        num_prefix_tokens=2,
        interpolation="bicubic",
        antialias=True,
    )
    pth, st = tmp_path / "deit.pth", tmp_path / "deit.safetensors"
    torch.save({"model": state}, pth)  # the layout of the official DeiT release files
    save_file(state, str(st))
    for checkpoint in (state, pth, str(st), imagenet):
        model = SureidStudentModel.from_timm(
            "deit_small_distilled_patch16_224", checkpoint=checkpoint
        )
        assert model.encoder.pos_embed.shape == (1, 130, 384)
        torch.testing.assert_close(model.encoder.pos_embed.data, expected_pos)
        # prefix positions (class, distillation) are kept as they were
        assert torch.equal(model.encoder.pos_embed.data[:, :2], state["pos_embed"][:, :2])
        assert torch.equal(model.encoder.blocks[5].mlp.fc2.weight, state["blocks.5.mlp.fc2.weight"])
        assert torch.equal(model.encoder.dist_token.data, state["dist_token"])


def test_overrides_and_overlapping_patches():
    imagenet = timm.create_model("deit_small_patch16_224", pretrained=False)
    model = SureidStudentModel.from_timm(
        "deit_small_patch16_224",
        checkpoint=imagenet,
        stride_size=12,
        keep_rate=0.5,
        num_identities=5,
    )
    assert model.config.grid_size == (21, 10) and model.encoder.pos_embed.shape == (1, 211, 384)
    assert model.config.keep_rate == 0.5 and model.head.classifier.out_features == 5
    assert torch.equal(model.encoder.patch_embed.proj.weight, imagenet.patch_embed.proj.weight)


def test_wrong_checkpoint_names_the_tensors(tmp_path):
    vit_b = timm.create_model("vit_base_patch16_224", pretrained=False).state_dict()
    with pytest.raises(SureidError, match=r"encoder\.cls_token.*\(1, 1, 768\).*\(1, 1, 384\)"):
        SureidStudentModel.from_timm("deit_small_patch16_224", checkpoint=vit_b)
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        SureidStudentModel.from_timm("deit_small_patch16_224", checkpoint=missing)
    with pytest.raises(SureidError, match="timm does not know"):
        SureidStudentModel.from_timm("not_a_model_name", checkpoint=vit_b)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SureidError, match="bad.pth"):
        SureidStudentModel.from_timm("deit_small_patch16_224", checkpoint=bad)


def test_cli_convert_writes_a_loadable_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "deit.safetensors"
    save_file(timm.create_model("deit_small_patch16_224", pretrained=False).state_dict(), str(ckpt))
    out = tmp_path / "student"
    code = main(
        [
            "convert",
            "--timm-name",
            "deit_small_patch16_224",
            "--checkpoint",
            str(ckpt),
            "--out",
            str(out),
            "--keep-rate",
            "0.6",
        ]
    )
    assert code == 0 and "saved SureidStudentModel" in capsys.readouterr().out
    loaded = SureidModel.from_pretrained(out)
    assert isinstance(loaded, SureidStudentModel) and loaded.config.keep_rate == 0.6
    code = main(
        [
            "convert",
            "--timm-name",
            "deit_small_patch16_224",
            "--checkpoint",
            str(tmp_path / "missing.pth"),
            "--out",
            str(out),
        ]
    )
    assert code == 2 and "missing.pth" in capsys.readouterr().err
