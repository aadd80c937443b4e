"""ONNX export of the inference graph (true token dropping), checked against PyTorch with
onnxruntime at two batch sizes other than the one the graph was traced with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sureid import (
    SureidModel,
    SureidStudentConfig,
    SureidStudentModel,
    SureidTeacherConfig,
    SureidTeacherModel,
)
from sureid.cli import main

from .conftest import TINY

ort = pytest.importorskip(
    "onnxruntime", reason="onnxruntime is not installed (pip install 'sureid[onnx]')"
)
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'sureid[onnx]')")

from sureid.export import (  # noqa: E402
    export_onnx,
    onnx_session,
    output_names,
    output_shapes,
    verify_onnx,
)


@pytest.fixture
def saved_student(tmp_path):
    """A tiny student with non-trivial weights (and BN statistics), saved and loaded back."""
    torch.manual_seed(0)
    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.6)
    model = SureidStudentModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.train()
    model(torch.randn(4, 3, 64, 32))  # move the BNNeck's running statistics
    model.save_pretrained(tmp_path / "student")
    return SureidModel.from_pretrained(tmp_path / "student").eval()


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 5])
def test_onnxruntime_matches_pytorch_with_dynamic_batch(saved_student, tmp_path, batch_size):
    path = export_onnx(saved_student, tmp_path / "student.onnx")
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    assert "TopK" in ops and "Gather" in ops  # the top-k and the indexed copy are in the graph
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    pixels = torch.randn(batch_size, 3, 64, 32, generator=torch.Generator().manual_seed(7))
    names = output_names(saved_student)
    assert names == ["embeddings", "kept_indices_1", "kept_indices_2", "kept_indices_3"]
    got = onnx_session(path, threads=1).run(names, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        want = saved_student(pixels)
    assert got[0].shape == (batch_size, 64)
    np.testing.assert_allclose(got[0], want.embeddings.numpy(), atol=1e-4, rtol=0)
    for onnx_idx, torch_idx, k in zip(got[1:], want.kept_indices, [19, 12, 7]):
        assert onnx_idx.shape == (batch_size, k)
        np.testing.assert_array_equal(np.sort(onnx_idx, 1), np.sort(torch_idx.numpy(), 1))
    assert saved_student.training is False  # export restores the mode


def test_outputs_have_static_sizes_and_a_dynamic_batch(saved_student, tmp_path):
    """Every output declares its sizes, only the batch axis is named: kept_indices_1 used to
    carry a generated name (TopKkept_indices_1_dim_1) instead of its keep count, embeddings
    another (BatchNormalizationembeddings_dim_1)."""
    path = export_onnx(saved_student, tmp_path / "student.onnx")
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    declared = {
        out.name: [dim.dim_param or dim.dim_value for dim in out.type.tensor_type.shape.dim]
        for out in graph.graph.output
    }
    assert declared == {
        "embeddings": ["batch", 64],
        "kept_indices_1": ["batch", 19],  # keep 0.6 of 32 tokens, stage by stage
        "kept_indices_2": ["batch", 12],
        "kept_indices_3": ["batch", 7],
    }
    assert declared == output_shapes(saved_student)
    assert list(saved_student.config.stage_keep_counts) == [19, 12, 7]
    session = onnx_session(path, threads=1)
    assert [out.shape for out in session.get_outputs()] == list(declared.values())
    got = session.run(None, {"pixel_values": np.zeros((3, 3, 64, 32), np.float32)})
    assert [g.shape for g in got] == [(3, 64), (3, 19), (3, 12), (3, 7)]


@pytest.mark.slow
def test_verify_and_teacher_export(saved_student, tmp_path):
    path = export_onnx(saved_student, tmp_path / "s.onnx")
    diffs = verify_onnx(saved_student, path, batch_sizes=(2, 3))
    assert set(diffs) == {2, 3} and max(diffs.values()) < 1e-4
    teacher = SureidTeacherModel(SureidTeacherConfig(**TINY)).eval()
    t_path = export_onnx(teacher, tmp_path / "t.onnx")
    assert output_names(teacher) == ["embeddings"]
    assert output_shapes(teacher) == {"embeddings": ["batch", 64]}
    dims = onnx.load(str(t_path)).graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 64]
    assert max(verify_onnx(teacher, t_path, batch_sizes=(1, 4)).values()) < 1e-4


def test_export_onnx_command(saved_student, tmp_path, capsys):
    saved_student.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "model.onnx"
    assert main(["export-onnx", "--model", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "dynamic batch" in printed
    assert "batch 1: max |embedding diff|" in printed and "batch 3" in printed
    assert main(["export-onnx", "--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing" in capsys.readouterr().err


def test_export_rejects_other_models(tmp_path):
    with pytest.raises(ValueError, match="SureidStudentModel or SureidTeacherModel"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError, match="export_onnx"):
        onnx_session(tmp_path / "nothing.onnx")
