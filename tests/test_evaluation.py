"""CMC / mAP / mINP on hand-computed cases, the protocols, chunking, re-ranking, `sureid evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sureid import (
    SureidError,
    SureidImageProcessor,
    SureidStudentConfig,
    SureidStudentModel,
    SureidTeacherConfig,
    SureidTeacherModel,
)
from sureid.cli import main
from sureid.evaluation import (
    auc_rows,
    check_token_selection,
    evaluate_model,
    evaluate_reid,
    evaluate_splits,
    patch_body_flags,
    protocol_for_dataset,
    re_rank,
    rerank_memory_bytes,
    spearman_rows,
)
from sureid.modeling_sureid import token_importance

from .conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


# 1-D features with the euclidean metric: every distance below is exact in float32, so the
# rankings (and the ties) are the ones worked out by hand in the comments.
GALLERY = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0], [0.5], [6.0]])
G_PIDS = [2, 1, 1, 3, 1, -1, 0]  # g5 is junk (pid -1), g6 a distractor (pid 0)
G_CAMS = [1, 1, 0, 1, 2, 1, 1]
QUERY = torch.tensor([[0.0], [10.0], [1.5], [3.5]])
Q_PIDS = [1, 3, 2, 3]
Q_CAMS = [0, 1, 0, 0]


def _eval(protocol, **kwargs):
    kwargs.setdefault("max_rank", 5)
    return evaluate_reid(
        QUERY,
        GALLERY,
        Q_PIDS,
        G_PIDS,
        Q_CAMS,
        G_CAMS,
        protocol=protocol,
        metric="euclidean",
        **kwargs,
    )


def test_market_protocol_by_hand():
    # q0 (pid 1, cam 0): g2 is pid 1 in cam 0 -> removed; g5 junk -> removed.
    #   ranking g0 (-) g1 (+) g3 (-) g4 (+) g6 (-): first match rank 2, AP = (1/2 + 2/4) / 2
    #   = 0.5, INP = 2 / 4 = 0.5.
    # q1 (pid 3, cam 1): its only match g3 is in cam 1 -> removed: no valid match, left out.
    # q2 (pid 2, cam 0): g0 and g1 tie at 0.5; g0 (the match) has the lower gallery index and
    #   ranks first: AP = INP = 1.
    # q3 (pid 3, cam 0): g2 and g3 tie at 0.5; g2 (pid 1, same camera but another pid, so it
    #   stays) ranks first: the match g3 is at rank 2, AP = INP = 0.5.
    m = _eval("market")
    assert m.num_query == 4 and m.num_gallery == 7
    assert m.num_valid_query == 3 and m.num_no_match == 1
    np.testing.assert_allclose(m.cmc, [1 / 3, 1, 1, 1, 1])
    assert m.mAP == pytest.approx(2 / 3) and m.mINP == pytest.approx(2 / 3)
    assert m.rank(1) == pytest.approx(1 / 3) and m.rank(50) == 1.0  # beyond max_rank: last value


def test_cross_protocol_by_hand():
    # No camera filtering (junk still removed):
    # q0: g0 - g1 + g2 + g3 - g4 + g6 -: AP = (1/2 + 2/3 + 3/5) / 3, INP = 3/5, first at 2.
    # q1: g6 - g4 - g3 + ...: AP = INP = 1/3, first at 3.
    # q2: AP = INP = 1 (rank 1).   q3: AP = INP = 1/2 (rank 2).
    m = _eval("cross")
    assert m.num_valid_query == 4 and m.num_no_match == 0
    np.testing.assert_allclose(m.cmc, [1 / 4, 3 / 4, 1, 1, 1])
    ap = [(1 / 2 + 2 / 3 + 3 / 5) / 3, 1 / 3, 1.0, 0.5]
    inp = [3 / 5, 1 / 3, 1.0, 0.5]
    assert m.mAP == pytest.approx(np.mean(ap)) and m.mINP == pytest.approx(np.mean(inp))
    # camids are optional under "cross"
    m2 = evaluate_reid(QUERY, GALLERY, Q_PIDS, G_PIDS, protocol="cross", metric="euclidean")
    assert m2.mAP == pytest.approx(m.mAP)


def test_ties_are_broken_by_gallery_order():
    q = torch.tensor([[0.0]])
    gallery = torch.tensor([[1.0], [-1.0]])  # both at distance 1
    wrong_first = evaluate_reid(q, gallery, [1], [2, 1], [0], [1, 1], metric="euclidean")
    right_first = evaluate_reid(q, gallery.flip(0), [1], [1, 2], [0], [1, 1], metric="euclidean")
    assert wrong_first.rank(1) == 0.0 and wrong_first.mAP == 0.5
    assert right_first.rank(1) == 1.0 and right_first.mAP == 1.0


def test_junk_never_counts_anywhere():
    base = _eval("market")
    # junk closest to every query, and junk in the query set
    gallery = torch.cat([torch.tensor([[0.0], [10.0], [1.5], [3.5]]), GALLERY])
    m = evaluate_reid(
        torch.cat([QUERY, torch.tensor([[2.0]])]),
        gallery,
        Q_PIDS + [-1],
        [-1] * 4 + G_PIDS,
        Q_CAMS + [1],
        [1] * 4 + G_CAMS,
        metric="euclidean",
        max_rank=5,
    )
    assert m.cmc == base.cmc and m.mAP == base.mAP and m.mINP == base.mINP
    assert m.num_no_match == base.num_no_match + 1  # the junk query has no valid match


def test_distractors_count_as_wrong_matches():
    # q2 was right at rank 1; a distractor (pid 0) at distance 0 pushes its match to rank 2.
    m = evaluate_reid(
        QUERY[2:3], torch.cat([torch.tensor([[1.5]]), GALLERY]), [2], [0] + G_PIDS, [0],
        [1] + G_CAMS, metric="euclidean",
    )  # fmt: skip
    assert m.rank(1) == 0.0 and m.mAP == 0.5 and m.mINP == 0.5


def test_no_valid_query_at_all():
    m = evaluate_reid(torch.eye(2), torch.eye(2), [1, 2], [3, 4], [0, 0], [1, 1])
    assert m.num_valid_query == 0 and m.num_no_match == 2
    assert np.isnan(m.mAP) and np.isnan(m.cmc[0])
    report = m.to_dict()  # JSON-ready: null, not NaN (which json.dump would write)
    assert report["mAP"] is None and report["R1"] is None and set(report["cmc"]) == {None}
    assert "NaN" not in json.dumps(report)


def _naive(qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank):
    """Straightforward per-query loop (numpy) with the documented rules."""
    dist = np.sqrt(((qf[:, None] - gf[None]) ** 2).sum(-1))
    cmc, aps, inps = np.zeros(max_rank), [], []
    for i in range(len(qf)):
        order = np.argsort(dist[i], kind="stable")
        keep = (g_pids[order] != -1) & ~(
            (g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i])
        )
        match = (g_pids[order] == q_pids[i])[keep]
        if not match.any():
            continue
        pos = np.flatnonzero(match) + 1
        cmc[pos[0] - 1 :] += 1
        aps.append(np.mean(np.arange(1, len(pos) + 1) / pos))
        inps.append(len(pos) / pos[-1])
    return cmc / len(aps), np.mean(aps), np.mean(inps), len(aps)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_evaluation_matches_a_naive_loop(chunk_size):
    rng = np.random.default_rng(0)
    # small integer features: many exact ties, several cameras, junk and distractors
    qf = rng.integers(0, 3, (40, 3)).astype(np.float32)
    gf = rng.integers(0, 3, (90, 3)).astype(np.float32)
    q_pids, g_pids = rng.integers(1, 8, 40), rng.integers(-1, 8, 90)
    q_cams, g_cams = rng.integers(0, 3, 40), rng.integers(0, 3, 90)
    m = evaluate_reid(
        qf, gf, q_pids, g_pids, q_cams, g_cams, metric="euclidean", max_rank=20,
        chunk_size=chunk_size,
    )  # fmt: skip
    cmc, mean_ap, mean_inp, valid = _naive(qf, gf, q_pids, g_pids, q_cams, g_cams, 20)
    assert m.num_valid_query == valid
    np.testing.assert_allclose(m.cmc, cmc)
    assert m.mAP == pytest.approx(mean_ap) and m.mINP == pytest.approx(mean_inp)


def test_cosine_metric_ignores_feature_norms():
    rng = np.random.default_rng(1)
    qf, gf = rng.normal(size=(10, 16)), rng.normal(size=(30, 16))
    args = (rng.integers(0, 4, 10), rng.integers(0, 4, 30), np.zeros(10), np.ones(30))
    a = evaluate_reid(qf, gf, *args)
    b = evaluate_reid(qf * 5, gf * rng.uniform(0.1, 3, (30, 1)), *args)
    assert a.cmc == b.cmc and a.mAP == pytest.approx(b.mAP)
    # on unit vectors the euclidean ranking is the cosine ranking
    un = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    c = evaluate_reid(un(qf), un(gf), *args, metric="euclidean")
    assert a.cmc == c.cmc and a.mAP == pytest.approx(c.mAP)


def test_argument_errors_name_the_fix():
    with pytest.raises(ValueError, match="protocol"):
        _eval("msmt")
    with pytest.raises(ValueError, match="camids"):
        evaluate_reid(QUERY, GALLERY, Q_PIDS, G_PIDS, protocol="market")
    with pytest.raises(ValueError, match="gallery_pids"):
        evaluate_reid(QUERY, GALLERY, Q_PIDS, G_PIDS[:3], Q_CAMS, G_CAMS)
    with pytest.raises(ValueError, match="same C"):
        evaluate_reid(QUERY, torch.zeros(7, 2), Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)
    with pytest.raises(ValueError, match="metric"):
        evaluate_reid(QUERY, GALLERY, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, metric="hamming")


def test_non_finite_features_are_refused_naming_the_rows():
    # ranked as they come, NaN rows gave R1 25 / mAP 44.6 "with 4/4 queries matched"
    nan_query = torch.full((4, 8), float("nan"))
    gallery = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    args = ([1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [0] * 4, [1] * 6)
    with pytest.raises(SureidError, match=r"query_features rows 0, 1, 2, 3 \(4 of 4\) contain NaN"):
        evaluate_reid(nan_query, gallery, *args)
    gallery[4, 2] = float("inf")
    with pytest.raises(SureidError, match=r"gallery_features rows 4 \(1 of 6\) contain NaN or inf"):
        evaluate_reid(gallery[:4], gallery, *args)


def test_protocols_of_the_named_data_sets():
    assert protocol_for_dataset("Occluded-Duke") == "market"
    assert protocol_for_dataset("market1501") == "market"
    assert protocol_for_dataset("occluded_reid") == "cross"
    assert protocol_for_dataset("partial_reid") == "cross"
    with pytest.raises(ValueError, match="protocol="):
        protocol_for_dataset("msmt17")


# --------------------------------------------------------------------------------------------
# re-ranking
# --------------------------------------------------------------------------------------------


def _k_reciprocal(initial_rank, i, k1):
    forward = initial_rank[i, : k1 + 1]
    backward = initial_rank[forward, : k1 + 1]
    return forward[np.where(backward == i)[0]]


def _reference_re_ranking(q, g, k1=20, k2=6, lambda_value=0.3):
    """A line-by-line transcription of the authors' code (zhunzhong07/person-re-ranking)."""
    feat = np.concatenate([q, g]).astype(np.float64)
    query_num, all_num = len(q), len(feat)
    sq = (feat**2).sum(1)
    original_dist = np.maximum(sq[:, None] + sq[None] - 2 * feat @ feat.T, 0)
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist)
    initial_rank = np.argsort(original_dist, kind="stable")
    for i in range(all_num):
        k_reciprocal_index = _k_reciprocal(initial_rank, i, k1)
        expansion = k_reciprocal_index
        for candidate in k_reciprocal_index:
            c_index = _k_reciprocal(initial_rank, candidate, int(np.around(k1 / 2)))
            if len(np.intersect1d(c_index, k_reciprocal_index)) > 2.0 / 3 * len(c_index):
                expansion = np.append(expansion, c_index)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        V[i, expansion] = weight / np.sum(weight)
    original_dist = original_dist[:query_num]
    if k2 != 1:
        V = np.stack([np.mean(V[initial_rank[i, :k2]], axis=0) for i in range(all_num)])
    inv_index = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard = np.zeros_like(original_dist)
    for i in range(query_num):
        temp_min = np.zeros(all_num)
        nonzero = np.where(V[i] != 0)[0]
        for j in nonzero:
            temp_min[inv_index[j]] += np.minimum(V[i, j], V[inv_index[j], j])
        jaccard[i] = 1 - temp_min / (2 - temp_min)
    final = jaccard * (1 - lambda_value) + original_dist * lambda_value
    return final[:query_num, query_num:]


@pytest.mark.parametrize("k1,k2", [(20, 6), (5, 1), (4, 3)])
def test_re_rank_matches_the_reference_code(k1, k2):
    rng = np.random.default_rng(k1 + k2)
    q, g = rng.normal(size=(6, 8)), rng.normal(size=(34, 8))
    ours = re_rank(torch.tensor(q), torch.tensor(g), k1, k2, metric="euclidean").numpy()
    np.testing.assert_allclose(ours, _reference_re_ranking(q, g, k1, k2), atol=1e-5)
    # "cosine": the reference on L2-normalised features
    un = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    ours = re_rank(torch.tensor(q), torch.tensor(g), k1, k2, metric="cosine").numpy()
    np.testing.assert_allclose(ours, _reference_re_ranking(un(q), un(g), k1, k2), atol=1e-5)


def test_re_ranking_fixes_an_obvious_mistake():
    # The query (pid 1) sits between its own tight cluster A (24 images) and a stray image of B
    # (pid 2) that is nearer than any A image; B's other 24 images form a cluster beyond it.
    # Plain distances rank the stray B first; its k-reciprocal neighbours are the Bs, the
    # query's are the As, so re-ranking (defaults k1 20, k2 6, lambda 0.3) puts an A first.
    gen = torch.Generator().manual_seed(0)
    n = 24
    cluster_a = torch.tensor([-0.6, 0.0]) + 0.05 * torch.randn(n, 2, generator=gen)
    stray_b = torch.tensor([[0.5, 0.0]])
    cluster_b = torch.tensor([0.8, 0.0]) + 0.02 * torch.randn(n, 2, generator=gen)
    gallery = torch.cat([cluster_a, stray_b, cluster_b])
    args = ([1], [1] * n + [2] * (n + 1), [0], [1] * (2 * n + 1))
    q = torch.zeros(1, 2)
    plain = evaluate_reid(q, gallery, *args, metric="euclidean")
    reranked = evaluate_reid(q, gallery, *args, metric="euclidean", rerank=True)
    assert plain.rank(1) == 0.0 and reranked.rank(1) == 1.0
    assert reranked.mAP == 1.0 > plain.mAP and reranked.rerank
    dist = re_rank(q, gallery, metric="euclidean")
    assert dist.shape == (1, len(gallery)) and torch.isfinite(dist).all()
    assert (dist >= 0).all() and (dist <= 1 + 1e-6).all()


def test_re_ranking_refuses_beyond_its_memory_limit():
    assert rerank_memory_bytes(2210, 17661) == 16 * 19871**2 + 2**27  # 6.0 GB
    with pytest.raises(SureidError, match=r"GB.*rerank_max_memory_gb"):
        re_rank(torch.randn(10, 4), torch.randn(100, 4), max_memory_gb=1e-6)
    with pytest.raises(SureidError, match="limit"):
        evaluate_reid(
            torch.randn(3, 4), torch.randn(9, 4), [1] * 3, [1] * 9, [0] * 3, [1] * 9,
            rerank=True, rerank_max_memory_gb=1e-7,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# `sureid evaluate` end to end
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.7)
    path = tmp_path_factory.mktemp("student")
    SureidStudentModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory):
    from sureid.data import make_synthetic_reid

    return make_synthetic_reid(
        tmp_path_factory.mktemp("synthetic"), num_train_ids=2, num_test_ids=4, size=(64, 32),
        images_per_train_id=2, queries_per_id=1, gallery_per_id=2, num_cameras=2,
    )  # fmt: skip


def test_cli_evaluate_prints_the_table_and_writes_json(
    tiny_model_dir, tiny_synthetic, tmp_path, capsys
):
    out = tmp_path / "report" / "eval.json"
    code = main(
        ["evaluate", "--model", str(tiny_model_dir), "--dataset", "synthetic", "--root",
         str(tiny_synthetic), "--rerank", "--batch-size", "4", "--out", str(out), "--device", "cpu"]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    for word in ("R1", "R5", "R10", "mAP", "mINP", "query", "gallery", "images/s"):
        assert word in text
    report = json.loads(out.read_text())
    assert report["num_query"] == 4 and report["num_gallery"] == 8 and report["rerank"]
    assert report["protocol"] == "market" and report["dataset"] == "synthetic"
    assert 0 <= report["R1"] <= report["R5"] <= report["R10"] <= 1
    assert 0 <= report["mINP"] <= 1 and 0 <= report["mAP"] <= 1 and report["images_per_second"] > 0
    assert len(report["cmc"]) == 50


def test_cli_evaluate_reports_a_bad_root(tiny_model_dir, tmp_path, capsys):
    code = main(
        ["evaluate", "--model", str(tiny_model_dir), "--dataset", "synthetic", "--root",
         str(tmp_path / "nowhere")]
    )  # fmt: skip
    assert code == 2 and "nowhere" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# What an HTS student's token predictors learned
# --------------------------------------------------------------------------------------------


def test_spearman_rows_by_hand():
    a = torch.tensor([[1.0, 2, 3, 4]] * 3)
    b = torch.tensor([[10.0, 20, 30, 40], [4.0, 3, 2, 1], [1.0, 3, 2, 4]])
    # Row 3: one adjacent swap, sum d^2 = 2: 1 - 6 * 2 / (4 * (16 - 1)) = 0.8.
    torch.testing.assert_close(spearman_rows(a, b), torch.tensor([1.0, -1.0, 0.8]))
    # Only the ranks count: a monotone transform of either side changes nothing.
    torch.testing.assert_close(spearman_rows(a.exp(), b * 3 - 1), torch.tensor([1.0, -1.0, 0.8]))


def test_auc_rows_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.9, 0.8], [0.5, 0.5, 0.5, 0.1]])
    labels = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    # Row 1: both positives above both negatives; row 2: below; row 3: the positive (0.5)
    # ties two negatives (1/2 each) and beats the third: (0.5 + 0.5 + 1) / 3.
    torch.testing.assert_close(auc_rows(scores, labels), torch.tensor([1.0, 0.0, 2.0 / 3.0]))
    # A row with one kind of label only has no AUC.
    one_kind = auc_rows(torch.rand(2, 5), torch.tensor([[1] * 5, [0] * 5], dtype=torch.bool))
    assert one_kind.isnan().all()


def _auc_by_loops(scores, flags) -> float:
    pos = [float(v) for v, f in zip(scores, flags, strict=True) if f]
    neg = [float(v) for v, f in zip(scores, flags, strict=True) if not f]
    if not pos or not neg:
        return float("nan")
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_patch_body_flags_by_hand(tmp_path):
    from PIL import Image

    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5))  # 64x32, patch 8: 8 x 4 grid
    mask = np.zeros((64, 32), dtype=bool)
    mask[0:16, 0:8] = True  # patches (0, 0) and (1, 0): all body
    mask[16:20, 8:16] = True  # patch (2, 1): 32 of 64 pixels ...
    mask[20, 8] = True  # ... plus one: over half
    mask[24:28, 8:16] = True  # patch (3, 1): exactly half, not over
    mask[32:36, 16:24] = True  # patch (4, 2): one pixel short of half
    mask[35, 23] = False
    expected = torch.zeros(32, dtype=torch.bool)
    expected[[0 * 4 + 0, 1 * 4 + 0, 2 * 4 + 1]] = True
    assert torch.equal(patch_body_flags(mask, config), expected)
    # The same mask at twice the size, as a PIL image or a PNG path, is resized to the input.
    big = np.kron(mask, np.ones((2, 2), dtype=bool))
    image = Image.fromarray(big)
    image.save(tmp_path / "mask.png")
    assert torch.equal(patch_body_flags(image, config), expected)
    assert torch.equal(patch_body_flags(tmp_path / "mask.png", config), expected)
    assert torch.equal(patch_body_flags(str(tmp_path / "mask.png"), config), expected)
    # Overlapping patches (stride 6): one flag per patch of the 10 x 5 grid.
    overlapping = SureidStudentConfig(**{**TINY, "stride_size": 6}, sparsify_layers=(1, 3, 5))
    assert patch_body_flags(mask, overlapping).shape == (overlapping.num_patches,) == (50,)


@pytest.fixture(scope="module")
def tiny_splits(tiny_synthetic):
    from sureid.data import load_reid_dataset

    return load_reid_dataset("synthetic", tiny_synthetic)


def test_check_token_selection_on_a_tiny_student(tiny_splits):
    torch.manual_seed(0)
    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.7)
    student = SureidStudentModel(config).eval()
    query, gallery = tiny_splits["query"], tiny_splits["gallery"]
    check = check_token_selection(student, query, gallery, protocol="market", device="cpu")
    # The predictor's numbers are the student's own (true dropping), as evaluate_model gives.
    expected = evaluate_model(student, query, gallery, "market", device="cpu", progress=False)
    assert check.predictor.rank(1) == pytest.approx(expected.metrics.rank(1), abs=1e-6)
    assert check.predictor.mAP == pytest.approx(expected.metrics.mAP, abs=1e-6)
    assert check.random.num_query == len(query) and check.random.num_gallery == len(gallery)
    assert check.guide is None and check.spearman is None
    summary = check.summary()
    assert summary["guide_R1"] is None and summary["guide_mAP"] is None
    assert summary["predictor_mAP"] == check.predictor.mAP and summary["random_R1"] is not None
    # Body shares from the synthetic set's masks, by hand: the patches that are mostly body,
    # over all patches (chance) and over the last stage's kept patches.
    flags = [patch_body_flags(path, config) for path in query["body_mask_path"]]
    pixels = SureidImageProcessor.from_model_config(config)(query["image"], return_tensors="pt")
    with torch.no_grad():
        kept = student(pixels["pixel_values"], hts_decisions="topk").keep_masks[-1] > 0
    chance = np.mean([float(f.float().mean()) for f in flags])
    share = np.mean([float(f[k].float().mean()) for f, k in zip(flags, kept, strict=True)])
    assert 0 < chance < 1 and 0 <= share <= 1
    assert check.body_chance == pytest.approx(chance, abs=1e-6)
    assert check.body_share == pytest.approx(share, abs=1e-6)
    # ... and after each stage (3 stages: the last is the body share above).
    with torch.no_grad():
        masks = student(pixels["pixel_values"], hts_decisions="topk").keep_masks
    by_stage = [
        np.mean([float(f[m > 0].float().mean()) for f, m in zip(flags, mask, strict=True)])
        for mask in masks
    ]
    assert check.body_share_by_stage == pytest.approx(by_stage, abs=1e-6) and len(by_stage) == 3
    assert check.body_share_by_stage[-1] == pytest.approx(check.body_share, abs=1e-9)
    assert summary["body_share_stage1"] == check.body_share_by_stage[0]
    # Body AUC of the stage-1 keep score, pair by pair, over the queries that have both kinds.
    with torch.no_grad():
        stage1 = student(pixels["pixel_values"], hts_decisions="topk").keep_logits[0]
    aucs = [_auc_by_loops(s, f) for s, f in zip(stage1, flags, strict=True)]
    assert check.body_auc == pytest.approx(np.nanmean(aucs), abs=1e-6)
    assert check.guide_body_auc is None
    # Random keeping: the mean over 5 seeded draws (CMC, mAP), each draw kept.
    assert len(check.random_draws) == 5
    assert check.random.mAP == pytest.approx(np.mean([d.mAP for d in check.random_draws]))
    assert check.random.rank(1) == pytest.approx(np.mean([d.rank(1) for d in check.random_draws]))
    assert summary["random_R1_min"] == min(d.rank(1) for d in check.random_draws)
    assert summary["random_R1_max"] == max(d.rank(1) for d in check.random_draws)
    single = check_token_selection(student, query, gallery, device="cpu", random_draws=1)
    assert len(single.random_draws) == 1 and single.random is single.random_draws[0]
    with pytest.raises(ValueError, match="random_draws must be at least 1, got 0"):
        check_token_selection(student, query, gallery, device="cpu", random_draws=0)

    # With a guide: its oracle metrics and the rank correlation; the predictor's numbers and
    # the seeded random keeping do not change; the models' training modes come back.
    torch.manual_seed(1)
    guide = SureidTeacherModel(SureidTeacherConfig(**TINY))
    student.train()
    guided = check_token_selection(student, query, gallery, guide, device="cpu")
    assert student.training and guide.training  # both modes restored
    assert guided.guide is not None and guided.guide.num_query == len(query)
    assert isinstance(guided.spearman, float) and -1.0 <= guided.spearman <= 1.0
    assert guided.predictor.mAP == pytest.approx(check.predictor.mAP, abs=1e-6)
    assert guided.random.mAP == pytest.approx(check.random.mAP, abs=1e-6)
    assert guided.summary()["guide_mAP"] == guided.guide.mAP
    # The guide's own body AUC: its rollout over the same patches.
    with torch.no_grad():
        rollout = token_importance(guide, pixels["pixel_values"], "rollout")
    guide_aucs = [_auc_by_loops(r, f) for r, f in zip(rollout, flags, strict=True)]
    assert guided.guide_body_auc == pytest.approx(np.nanmean(guide_aucs), abs=1e-6)
    assert guided.body_auc == pytest.approx(check.body_auc, abs=1e-6)
    # The Spearman against the guide's attention-norm too (the default other importance).
    with torch.no_grad():
        norm = token_importance(guide, pixels["pixel_values"], "attention-norm")
    expected_rho = float(spearman_rows(stage1, norm).mean())
    assert guided.other_spearman["attention-norm"] == pytest.approx(expected_rho, abs=1e-6)
    assert guided.summary()["spearman_attention_norm"] == guided.other_spearman["attention-norm"]
    assert check.other_spearman == {} and "spearman_attention_norm" not in summary
    with pytest.raises(ValueError, match="unknown token importance \\['gradcam'\\]"):
        check_token_selection(
            student, query, gallery, guide, device="cpu", other_importances=("gradcam",)
        )

    with pytest.raises(ValueError, match="1 body masks for 4 query images"):
        check_token_selection(student, query, gallery, body_masks=["x.png"], device="cpu")
    dense = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3), keep_rate=1.0))
    with pytest.raises(SureidError, match="needs an HTS student"):
        check_token_selection(dense, query, gallery, device="cpu")


def test_check_token_selection_measures_how_close_training_is_to_inference(tiny_splits):
    """``sampling_overlap``: the share of the inference top-k that a draw of the training
    sampling keeps too. Exact-k training decisions keep exactly k (chance k / N), the inference
    decisions themselves all of the top-k; the draw does not move the check's other draws."""
    torch.manual_seed(0)
    student = SureidStudentModel(
        SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.7)
    ).eval()
    query, gallery = tiny_splits["query"], tiny_splits["gallery"]
    n = student.config.num_patches
    k = student.config.stage_keep_counts[-1]
    checks = {}
    for sampling in ("gumbel", "gumbel-topk", "topk"):
        student.config.hts_sampling = sampling
        checks[sampling] = check_token_selection(
            student, query, gallery, device="cpu", random_draws=2
        )
    paper = checks["gumbel"]
    assert 0.0 <= paper.sampling_overlap <= 1.0 and 0.0 < paper.sampling_overlap_chance < 1.0
    assert paper.summary()["sampling_overlap"] == paper.sampling_overlap
    assert checks["gumbel-topk"].sampling_overlap_chance == pytest.approx(k / n)
    assert checks["topk"].sampling_overlap == pytest.approx(1.0)
    assert checks["topk"].sampling_overlap_chance == pytest.approx(k / n)
    for other in checks.values():  # random keeping drew the same tokens every time
        assert other.random.mAP == pytest.approx(paper.random.mAP, abs=1e-9)
    student.config.hts_sampling = "gumbel"
    again = check_token_selection(student, query, gallery, device="cpu", random_draws=2)
    assert again.sampling_overlap == pytest.approx(paper.sampling_overlap)
    # one batch by hand: the same draw (same seed) of the training sampling against the top-k
    from sureid.evaluation import _SelectionTally

    pixels = SureidImageProcessor.from_model_config(student.config)(
        query["image"], return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        topk = student(pixels, hts_decisions="topk").keep_masks[-1] > 0
        tally = _SelectionTally(student, None, "rollout", None)
        torch.manual_seed(5)
        tally._add_sampling_overlap(pixels, topk)
        torch.manual_seed(5)
        sampled = student(pixels, hts_decisions="gumbel").keep_masks[-1] > 0
    assert not torch.equal(sampled, topk)  # a real draw, not the top-k again
    overlap = (sampled & topk).float().sum(1) / topk.float().sum(1)
    assert torch.allclose(tally.sampling_overlap[0], overlap)
    assert torch.allclose(tally.sampling_chance[0], sampled.float().sum(1) / n)


def test_check_token_selection_measures_the_occluder(tiny_splits):
    """With the synthetic set's occluder masks: the last stage's share of occluder patches, and
    R1 / mAP of the stage-1 ranking held fixed, without and with the occluder put last, all by
    hand; without occluder masks the measures are absent."""
    torch.manual_seed(0)
    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.7)
    student = SureidStudentModel(config).eval()
    query, gallery = tiny_splits["query"], tiny_splits["gallery"]
    check = check_token_selection(student, query, gallery, device="cpu", random_draws=1)
    processor = SureidImageProcessor.from_model_config(config)

    def by_hand(split, occluder_first: bool):
        """Embeddings with the stage-1 ranking (occluder last unless ``occluder_first``), and
        the split's occluder flags."""
        pixels = processor(split["image"], return_tensors="pt")["pixel_values"]
        flags = torch.stack([patch_body_flags(p, config) for p in split["occluder_mask_path"]])
        with torch.no_grad():
            masked = student(pixels, hts_decisions="topk")
            stage1 = masked.keep_logits[0]
            ranks = stage1.argsort(dim=-1).argsort(dim=-1).float()
            scores = ranks if occluder_first else ranks - config.num_patches * flags.float()
            out = student(pixels, hts_decisions="scores", token_scores=scores)
        return F.normalize(out.embeddings, dim=1), flags, masked.keep_masks[-1] > 0

    for name, occluder_first in (("stage1_ranking", True), ("occluder_dropped", False)):
        q, q_flags, kept = by_hand(query, occluder_first)
        g, _, _ = by_hand(gallery, occluder_first)
        expected = evaluate_splits(q, g, query, gallery, "market")
        metrics = getattr(check, name)
        assert metrics.rank(1) == pytest.approx(expected.rank(1), abs=1e-6)
        assert metrics.mAP == pytest.approx(expected.mAP, abs=1e-6)
        assert check.summary()[f"{name}_mAP"] == metrics.mAP
    assert q_flags.any()  # every query is occluded
    share = np.mean([float(f[k].float().mean()) for f, k in zip(q_flags, kept, strict=True)])
    chance = np.mean([float(f.float().mean()) for f in q_flags])
    assert check.occluder_share == pytest.approx(share, abs=1e-6)
    assert check.occluder_chance == pytest.approx(chance, abs=1e-6) and 0 < chance < 1
    # Blank occluder masks: nothing to drop, so both rankings score the same, and no share.
    blank = {
        name: [np.zeros((64, 32), dtype=bool)] * len(split)
        for name, split in (("query", query), ("gallery", gallery))
    }
    none = check_token_selection(
        student, query, gallery, device="cpu", random_draws=1, occluder_masks=blank
    )
    assert none.occluder_share == 0.0 and none.occluder_chance == 0.0
    assert none.occluder_dropped.mAP == pytest.approx(none.stage1_ranking.mAP, abs=1e-9)
    assert none.stage1_ranking.mAP == pytest.approx(check.stage1_ranking.mAP, abs=1e-6)
    skipped = check_token_selection(
        student, query, gallery, device="cpu", random_draws=1, occluder_masks=None
    )
    assert skipped.occluder_share is None and skipped.occluder_dropped is None
    assert skipped.summary()["occluder_dropped_R1"] is None
    assert skipped.predictor.mAP == pytest.approx(check.predictor.mAP, abs=1e-6)
    with pytest.raises(ValueError, match="one mask per gallery image: 1 masks for"):
        check_token_selection(
            student,
            query,
            gallery,
            device="cpu",
            occluder_masks={"query": blank["query"], "gallery": blank["gallery"][:1]},
        )
    with pytest.raises(ValueError, match='occluder_masks must be "auto", None or a mapping'):
        check_token_selection(student, query, gallery, device="cpu", occluder_masks="yes")
