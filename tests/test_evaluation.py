"""CMC / mAP / mINP on hand-computed cases, the protocols, chunking, re-ranking, `sureid evaluate`.

The token-selection check and the importance maps are in tests/test_analysis.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sureid import SureidError, SureidStudentConfig, SureidStudentModel
from sureid.cli import main
from sureid.evaluation import (
    evaluate_reid,
    protocol_for_dataset,
    re_rank,
    rerank_memory_bytes,
)

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
    with pytest.raises(
        ValueError, match=r"unknown data set name 'msmt17'; expected one of: "
    ) as err:
        protocol_for_dataset("msmt17")
    assert "market1501" in str(err.value) and "protocol=" not in str(err.value)


def test_sureid_evaluate_names_an_unknown_data_set_as_extract_does(tmp_path, capsys):
    """A typo in --dataset is the data set name's fault: `sureid evaluate` says so in the words
    of `sureid extract` (it said "no evaluation protocol known ... pass protocol='market'")."""
    typo = ["--dataset", "markt1501", "--root", str(tmp_path)]
    assert main(["evaluate", "--model", str(tmp_path / "ckpt"), *typo]) == 2
    evaluate_err = capsys.readouterr().err
    assert main(["extract", "--model", str(tmp_path / "ckpt"), *typo, "--out", "g"]) == 2
    extract_err = capsys.readouterr().err
    expected = "error: unknown data set name 'markt1501'; expected one of: market1501, "
    assert expected in evaluate_err and "protocol" not in evaluate_err
    assert evaluate_err.removeprefix("sureid evaluate") == extract_err.removeprefix(
        "sureid extract"
    )


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


def test_evaluate_model_extracts_with_the_dtype_it_is_given(tiny_synthetic, monkeypatch):
    import sureid.inference
    from sureid.data import load_reid_dataset
    from sureid.evaluation import evaluate_model

    seen = []
    extract = sureid.inference.extract_features

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dtype"))
        return extract(*args, **kwargs)

    monkeypatch.setattr(sureid.inference, "extract_features", spy)
    data = load_reid_dataset("synthetic", tiny_synthetic)
    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.7)
    model = SureidStudentModel(config).eval()
    result = evaluate_model(
        model, data["query"], data["gallery"], device="cpu", progress=False, dtype="bfloat16"
    )
    assert seen == ["bfloat16", "bfloat16"]  # query and gallery
    assert 0.0 <= result.metrics.mAP <= 1.0
