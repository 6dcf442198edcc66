"""aladin.evaluation against naive loops, hand-computed cases and exact/Monte-Carlo chance levels."""
import itertools
import json
from fractions import Fraction

import numpy as np
import pytest
import torch

from aladin import data
from aladin import evaluation as ev


def shuffled_layout(n_images, per_image, seed):
    """image_of_caption with `per_image` captions per image in a shuffled column order."""
    return torch.randperm(n_images * per_image, generator=torch.Generator().manual_seed(seed)) // per_image


def test_ranks_match_naive_loop_with_shuffled_captions():
    n, m = 6, 30
    sims = torch.randn(n, m, generator=torch.Generator().manual_seed(0))  # (n_images, n_captions)
    ioc = shuffled_layout(n, 5, seed=1)
    order = sims.argsort(dim=1, descending=True).tolist()
    slow_i2t = [min(order[i].index(c) for c in range(m) if ioc[c] == i) for i in range(n)]
    order_t = sims.argsort(dim=0, descending=True).T.tolist()  # per caption, images best first
    slow_t2i = [order_t[c].index(int(ioc[c])) for c in range(m)]
    fast_i2t, fast_t2i = ev.i2t_ranks(sims, ioc), ev.t2i_ranks(sims, ioc)
    assert fast_i2t.dtype == np.int64 and fast_t2i.dtype == np.int64
    assert fast_i2t.tolist() == slow_i2t
    assert fast_t2i.tolist() == slow_t2i
    # numpy input and a list map give the same answer
    assert ev.i2t_ranks(sims.numpy(), ioc.tolist()).tolist() == slow_i2t


def test_recall_summary_hand_computed():
    # ranks 0, 4, 9, 10, 20: R@1 1/5, R@5 2/5, R@10 3/5; median 9 -> medr 10; mean 43/5 -> meanr 9.6
    got = ev.recall_summary(np.array([0, 4, 9, 10, 20]))
    assert got == {"r1": 20.0, "r5": 40.0, "r10": 60.0, "medr": 10.0, "meanr": 9.6}
    # an even count: median 1.5 -> floor 1 -> medr 2
    assert ev.recall_summary([0, 1, 2, 3])["medr"] == 2.0
    assert all(type(v) is float for v in got.values())


def test_perfect_model():
    n, per = 7, 5
    ioc = shuffled_layout(n, per, seed=2)
    sims = (ioc[None, :] == torch.arange(n)[:, None]).float()  # 1 for own captions, 0 elsewhere
    for metrics in (ev.i2t(sims, ioc), ev.t2i(sims, ioc)):
        assert metrics == {"r1": 100.0, "r5": 100.0, "r10": 100.0, "medr": 1.0, "meanr": 1.0}


def test_model_that_ranks_the_right_item_last():
    n, per = 12, 2
    ioc = shuffled_layout(n, per, seed=3)
    sims = -(ioc[None, :] == torch.arange(n)[:, None]).float()  # own captions score -1, others 0
    # t2i: every other image (11) scores higher -> rank 11; i2t: 22 foreign captions above -> rank 22
    assert ev.t2i(sims, ioc) == {"r1": 0.0, "r5": 0.0, "r10": 0.0, "medr": 12.0, "meanr": 12.0}
    assert ev.i2t(sims, ioc) == {"r1": 0.0, "r5": 0.0, "r10": 0.0, "medr": 23.0, "meanr": 23.0}


def test_two_images_by_hand_with_ties():
    ioc = [0, 1, 1, 0]
    sims = np.array([[0.9, 0.1, 0.3, 0.2],
                     [0.9, 0.5, 0.3, 0.6]])
    # i2t: image 0's best own caption c0 (0.9) is first -> 0; image 1's best own is c1 (0.5), below
    # 0.9 and 0.6 -> 2
    assert ev.i2t_ranks(sims, ioc).tolist() == [0, 2]
    # t2i: c0 ties 0.9/0.9 -> 1 (ties go against the positive); c1 0.5 > 0.1 -> 0; c2 ties 0.3/0.3 -> 1;
    # c3 (image 0, 0.2) is below 0.6 -> 1
    assert ev.t2i_ranks(sims, ioc).tolist() == [1, 0, 1, 1]
    i2t, t2i = ev.i2t(sims, ioc), ev.t2i(sims, ioc)
    assert i2t == {"r1": 50.0, "r5": 100.0, "r10": 100.0, "medr": 2.0, "meanr": 2.0}
    assert t2i == {"r1": 25.0, "r5": 100.0, "r10": 100.0, "medr": 2.0, "meanr": 1.75}
    assert ev.rsum(i2t, t2i) == 475.0


def test_a_collapsed_model_that_scores_everything_equal_ranks_last():
    # With zero-fill (quirk Q7) a collapsed alignment head scores every pair 0; it must not look perfect.
    sims = torch.zeros(3, 6)
    assert ev.i2t_ranks(sims).tolist() == [4, 4, 4]  # the 4 foreign captions tie and rank above
    assert ev.t2i_ranks(sims).tolist() == [2] * 6  # both other images rank above


def test_default_layout_is_consecutive_groups():
    sims = torch.randn(4, 20, generator=torch.Generator().manual_seed(4))
    explicit = torch.arange(20) // 5
    assert ev.i2t(sims) == ev.i2t(sims, explicit) and ev.t2i(sims) == ev.t2i(sims, explicit)
    with pytest.raises(ValueError, match="multiple of the number of images"):
        ev.i2t(torch.zeros(3, 10))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="image 2 has no caption"):
        ev.i2t(torch.zeros(3, 4), [0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"values must lie in \[0, 2\)"):
        ev.t2i(torch.zeros(2, 2), [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        ev.t2i(torch.tensor([[float("nan"), 0.0], [0.0, 0.0]]), [0, 1])


def test_whole_matrix_record_schema():
    sims = torch.randn(5, 25, generator=torch.Generator().manual_seed(5))
    record = ev.evaluate_protocol(sims, None, protocol="coco_5k")
    assert set(record) == {"protocol", "n_images", "n_captions", "n_folds", "i2t", "t2i", "rsum", "chance"}
    assert (record["protocol"], record["n_images"], record["n_captions"], record["n_folds"]) == ("coco_5k", 5, 25, 1)
    assert record["i2t"] == ev.i2t(sims) and record["t2i"] == ev.t2i(sims)
    assert record["rsum"] == ev.rsum(record["i2t"], record["t2i"])
    assert set(record["chance"]) == {"i2t", "t2i", "rsum"}
    assert json.loads(json.dumps(record)) == record


def test_fold_protocol_is_the_mean_of_independent_folds():
    n, per, fold = 13, 3, 4  # 3 folds of 4 images; image 12 fills no fold and is left out
    ioc = shuffled_layout(n, per, seed=6)
    sims = torch.randn(n, n * per, generator=torch.Generator().manual_seed(7))
    record = ev.evaluate_protocol(sims, ioc, fold_size=fold, protocol="coco_1k_5fold")
    assert (record["n_folds"], record["n_images"], record["n_captions"]) == (3, 4, 12)
    assert list(record["folds"]) == ["0", "1", "2"]

    per_fold = []
    for f in range(3):
        images = list(range(f * fold, (f + 1) * fold))
        captions = [c for c in range(n * per) if int(ioc[c]) in images]
        sub = sims[images][:, captions]
        sub_ioc = [images.index(int(ioc[c])) for c in captions]
        per_fold.append((ev.i2t(sub, sub_ioc), ev.t2i(sub, sub_ioc)))
        assert record["folds"][str(f)]["i2t"] == per_fold[-1][0]
        assert record["folds"][str(f)]["t2i"] == per_fold[-1][1]
        assert record["folds"][str(f)]["n_captions"] == 12
    for d, direction in enumerate(("i2t", "t2i")):
        for key in ("r1", "r5", "r10", "medr", "meanr"):
            assert record[direction][key] == pytest.approx(np.mean([p[d][key] for p in per_fold]))
    assert record["rsum"] == pytest.approx(np.mean([ev.rsum(*p) for p in per_fold]))
    # chance of a fold: 4 images with 3 of 12 captions each
    assert record["chance"]["t2i"]["r1"] == pytest.approx(25.0)
    assert record["chance"]["i2t"]["r1"] == pytest.approx(25.0)
    assert json.loads(json.dumps(record)) == record


def test_fold_size_is_checked():
    with pytest.raises(ValueError, match="fold_size"):
        ev.evaluate_protocol(torch.zeros(3, 6), None, fold_size=4)


def exhaustive_chance(ioc, n_images):
    """Average R@K over every ordering of the captions (i2t) and of the images (t2i), as fractions."""
    n_captions = len(ioc)
    i2t = {k: Fraction(0) for k in ev.KS}
    perms = list(itertools.permutations(range(n_captions)))
    for perm in perms:
        position = {c: p for p, c in enumerate(perm)}
        for i in range(n_images):
            rank = min(position[c] for c in range(n_captions) if ioc[c] == i)
            for k in ev.KS:
                i2t[k] += Fraction(int(rank < k), len(perms) * n_images)
    t2i = {k: Fraction(0) for k in ev.KS}
    image_perms = list(itertools.permutations(range(n_images)))
    for perm in image_perms:
        for c in range(n_captions):
            rank = perm.index(ioc[c])
            for k in ev.KS:
                t2i[k] += Fraction(int(rank < k), len(image_perms) * n_captions)
    return {k: float(100 * v) for k, v in i2t.items()}, {k: float(100 * v) for k, v in t2i.items()}


def test_chance_matches_exhaustive_enumeration():
    ioc = np.array([2, 0, 1, 2, 1, 2, 1])  # uneven: images have 1, 3 and 3 captions among 7
    i2t, t2i = exhaustive_chance(ioc.tolist(), 3)
    chance = ev.chance_metrics(ioc, 3)
    for k in ev.KS:
        assert chance["i2t"][f"r{k}"] == pytest.approx(i2t[k], abs=1e-9)
        assert chance["t2i"][f"r{k}"] == pytest.approx(t2i[k], abs=1e-9)
    # by hand: t2i R@1 = 1/3; i2t R@1 = mean of c/7 = (1 + 3 + 3) / 21
    assert chance["t2i"]["r1"] == pytest.approx(100 / 3)
    assert chance["i2t"]["r1"] == pytest.approx(100 * 7 / 21)
    assert chance["rsum"] == pytest.approx(sum(i2t.values()) + sum(t2i.values()))


def test_chance_matches_monte_carlo():
    n, per, trials = 20, 5, 300
    ioc = shuffled_layout(n, per, seed=8)
    gen = torch.Generator().manual_seed(9)
    runs = [(ev.i2t(s, ioc), ev.t2i(s, ioc)) for s in torch.rand(trials, n, n * per, generator=gen)]
    chance = ev.chance_metrics(ioc.numpy(), n)
    for d, direction in enumerate(("i2t", "t2i")):
        for k in ev.KS:
            estimate = np.mean([r[d][f"r{k}"] for r in runs])
            assert estimate == pytest.approx(chance[direction][f"r{k}"], abs=2.0), (direction, k)


# ---------------------------------------------------------------------------------------------------
# Re-ranking and NDCG inside a protocol


def naive_rerank_ranks(match, align, ioc, k):
    """Python loops: per query, the shortlist is every item scoring >= the k-th best matching score;
    shortlisted items rank first by alignment score, the rest after by matching score; ties against the
    positive (an item whose key equals the positive's ranks above it)."""
    match, align = np.asarray(match), np.asarray(align)
    n, m = match.shape

    def key(short, i, c):
        return (1, align[i, c]) if short else (0, match[i, c])

    t2i = []
    for c in range(m):
        kth = sorted(match[:, c], reverse=True)[min(k, n) - 1]
        keys = [key(match[i, c] >= kth, i, c) for i in range(n)]
        t2i.append(sum(1 for i in range(n) if i != ioc[c] and keys[i] >= keys[ioc[c]]))
    i2t = []
    for i in range(n):
        kth = sorted(match[i], reverse=True)[min(k, m) - 1]
        keys = [key(match[i, c] >= kth, i, c) for c in range(m)]
        best = max(keys[c] for c in range(m) if ioc[c] == i)
        i2t.append(sum(1 for c in range(m) if ioc[c] != i and keys[c] >= best))
    return np.array(i2t), np.array(t2i)


@pytest.mark.parametrize("k", [1, 3, 8, 50])
def test_rerank_ranks_match_naive_loops_with_ties(k):
    n, per = 8, 3
    ioc = shuffled_layout(n, per, seed=10).numpy()
    rng = np.random.default_rng(k)
    match = rng.integers(0, 4, size=(n, n * per)).astype(np.float64)  # ties, also at the shortlist edge
    align = rng.integers(0, 4, size=(n, n * per)).astype(np.float64)
    record = ev.evaluate_protocol(match, ioc, rerank=(align, k))
    slow_i2t, slow_t2i = naive_rerank_ranks(match, align, ioc, k)
    assert record["i2t"] == ev.recall_summary(slow_i2t)
    assert record["t2i"] == ev.recall_summary(slow_t2i)
    assert record["rerank_k"] == k and record["shortlist"] == {"i2t": min(k, n * per), "t2i": min(k, n)}


def test_rerank_limits_are_the_two_heads():
    n, per = 10, 5
    ioc = shuffled_layout(n, per, seed=11)
    gen = torch.Generator().manual_seed(12)
    match, align = torch.randn(n, n * per, generator=gen), torch.randn(n, n * per, generator=gen)
    full = ev.evaluate_protocol(match, ioc, rerank=(align, n * per))  # every item shortlisted
    alone = ev.evaluate_protocol(align, ioc)
    assert (full["i2t"], full["t2i"]) == (alone["i2t"], alone["t2i"])
    # a shortlist of one keeps the matching head's top item, so R@1 is the matching head's
    top1 = ev.evaluate_protocol(match, ioc, rerank=(align, 1))
    plain = ev.evaluate_protocol(match, ioc)
    assert top1["t2i"]["r1"] == plain["t2i"]["r1"] and top1["i2t"]["r1"] == plain["i2t"]["r1"]
    assert top1["t2i"] != alone["t2i"]


def test_fold_protocol_reranks_and_scores_ndcg_within_each_fold():
    from aladin import ndcg

    n, per, fold, k = 12, 3, 4, 2
    ioc = shuffled_layout(n, per, seed=13).numpy()
    gen = torch.Generator().manual_seed(14)
    match, align = torch.randn(n, n * per, generator=gen).numpy(), torch.randn(n, n * per, generator=gen).numpy()
    relevance = np.round(np.random.default_rng(15).random((n * per, n)), 2)  # (captions, images)
    record = ev.evaluate_protocol(match, ioc, fold_size=fold, protocol="coco_1k_5fold",
                                  relevance=relevance, rerank=(align, k))
    folds = []
    for f in range(n // fold):
        images = np.arange(f * fold, (f + 1) * fold)
        captions = np.flatnonzero(np.isin(ioc, images))
        sub_ioc = ioc[captions] - f * fold
        m_sub, a_sub = match[images][:, captions], align[images][:, captions]
        slow_i2t, slow_t2i = naive_rerank_ranks(m_sub, a_sub, sub_ioc, k)  # shortlist within the fold
        rel = relevance[captions][:, images]
        # NDCG on the re-ranked orders: shortlisted items first (tier), by alignment, then by matching
        tier_t2i = m_sub >= -np.sort(-m_sub, axis=0)[k - 1][None, :]
        tier_i2t = m_sub >= -np.sort(-m_sub, axis=1)[:, k - 1][:, None]
        t2i_nd = ndcg.ndcg_per_query(np.where(tier_t2i, a_sub, m_sub).T, rel, 25, tier_t2i.T)
        i2t_nd = ndcg.ndcg_per_query(np.where(tier_i2t, a_sub, m_sub), rel.T, 25, tier_i2t)
        folds.append({"i2t": ev.recall_summary(slow_i2t), "t2i": ev.recall_summary(slow_t2i),
                      "ndcg_rougeL_i2t": float(i2t_nd[i2t_nd != 0].mean()), "ndcg_rougeL_t2i": float(t2i_nd.mean())})
        got = record["folds"][str(f)]
        assert (got["i2t"], got["t2i"]) == (folds[-1]["i2t"], folds[-1]["t2i"])
        assert got["ndcg_rougeL_i2t"] == pytest.approx(folds[-1]["ndcg_rougeL_i2t"])
        assert got["ndcg_rougeL_t2i"] == pytest.approx(folds[-1]["ndcg_rougeL_t2i"])
    for key in ("ndcg_rougeL_i2t", "ndcg_rougeL_t2i"):
        assert record[key] == pytest.approx(np.mean([f[key] for f in folds]))
    assert record["ndcg_spice"].startswith("absent")
    assert json.loads(json.dumps(record)) == record


def test_ndcg_of_a_plain_head_matches_naive_sorting():
    n, per = 5, 4
    ioc = shuffled_layout(n, per, seed=16).numpy()
    sims = np.random.default_rng(17).integers(0, 3, size=(n, n * per)).astype(float)  # ties
    relevance = np.random.default_rng(18).random((n * per, n)) * (np.random.default_rng(19).random((n * per, n)) < 0.5)
    record = ev.evaluate_protocol(sims, ioc, relevance=relevance)

    def ndcg_row(scores, rel):
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], rel[j]))[:25]
        dcg = sum((2 ** rel[j] - 1) / np.log2(p + 2) for p, j in enumerate(order))
        idcg = sum((2 ** r - 1) / np.log2(p + 2) for p, r in enumerate(sorted(rel, reverse=True)[:25]))
        return dcg / idcg if idcg else 0.0

    t2i = [ndcg_row(sims[:, c], relevance[c]) for c in range(n * per)]
    i2t = [ndcg_row(sims[i], relevance[:, i]) for i in range(n)]
    assert record["ndcg_rougeL_t2i"] == pytest.approx(np.mean(t2i))
    assert record["ndcg_rougeL_i2t"] == pytest.approx(np.mean([v for v in i2t if v != 0]))
    with pytest.raises(ValueError, match="relevance must be"):
        ev.evaluate_protocol(sims, ioc, relevance=relevance.T)


# ---------------------------------------------------------------------------------------------------
# The single 1K protocol: one image subset (VinVL's test_img_keys_1k.tsv) evaluated once


def naive_subset_ranks(sims, ioc, subset):
    """Python loops over the sub-problem: only the subset's images and their own captions take part; ties
    go against the positive."""
    captions = [c for c in range(len(ioc)) if ioc[c] in subset]
    i2t = []
    for i in subset:
        best = max(sims[i][c] for c in captions if ioc[c] == i)
        i2t.append(sum(1 for c in captions if ioc[c] != i and sims[i][c] >= best))
    t2i = [sum(1 for j in subset if j != ioc[c] and sims[j][c] >= sims[ioc[c]][c]) for c in captions]
    return i2t, t2i, captions


def naive_summary(ranks):
    ordered = sorted(ranks)
    n = len(ordered)
    median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    return {"r1": 100.0 * sum(r < 1 for r in ranks) / n, "r5": 100.0 * sum(r < 5 for r in ranks) / n,
            "r10": 100.0 * sum(r < 10 for r in ranks) / n, "medr": float(int(median) + 1),
            "meanr": sum(ranks) / n + 1}


def naive_ndcg(scores, rel, rank=25):
    """Best score first, equal scores lowest relevance first (aladin.ndcg's pessimistic tie rule)."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], rel[j]))[:rank]
    dcg = sum((2 ** rel[j] - 1) / np.log2(p + 2) for p, j in enumerate(order))
    idcg = sum((2 ** r - 1) / np.log2(p + 2) for p, r in enumerate(sorted(rel, reverse=True)[:rank]))
    return dcg / idcg if idcg else 0.0


def test_single_subset_protocol_matches_naive_loops_with_ties():
    n, per = 9, 3
    ioc = shuffled_layout(n, per, seed=20).tolist()
    rng = np.random.default_rng(21)
    sims = rng.integers(0, 3, size=(n, n * per)).astype(np.float64)  # many ties, some at the positive
    relevance = np.round(rng.random((n * per, n)), 1) * (rng.random((n * per, n)) < 0.6)  # (captions, images)
    subset = [7, 2, 4, 5]  # hand-picked, not in order, not a fold
    record = ev.evaluate_protocol(sims, ioc, protocol="vinvl_1k", relevance=relevance, images=subset)

    slow_i2t, slow_t2i, captions = naive_subset_ranks(sims.tolist(), ioc, subset)
    assert (record["protocol"], record["n_images"], record["n_captions"], record["n_folds"]) == \
        ("vinvl_1k", 4, 12, 1)
    assert record["i2t"] == pytest.approx(naive_summary(slow_i2t))
    assert record["t2i"] == pytest.approx(naive_summary(slow_t2i))
    assert record["rsum"] == pytest.approx(sum(naive_summary(slow_i2t)[f"r{k}"] + naive_summary(slow_t2i)[f"r{k}"]
                                               for k in ev.KS))
    assert 0 < record["rsum"] < 600 and "folds" not in record
    # chance of 4 images with 3 of 12 captions each: t2i min(K, 4) / 4; i2t 1 - C(9, K) / C(12, K)
    assert record["chance"]["t2i"] == pytest.approx({"r1": 25.0, "r5": 100.0, "r10": 100.0})
    assert record["chance"]["i2t"]["r1"] == pytest.approx(25.0)
    assert record["chance"]["i2t"]["r5"] == pytest.approx(100 * (1 - 126 / 792))
    assert record["chance"]["i2t"]["r10"] == pytest.approx(100.0)
    # NDCG@25 inside the subset: image queries over the subset's captions, caption queries over its images
    i2t_nd = [naive_ndcg([sims[i, c] for c in captions], [relevance[c, i] for c in captions]) for i in subset]
    t2i_nd = [naive_ndcg([sims[i, c] for i in subset], [relevance[c, i] for i in subset]) for c in captions]
    assert record["ndcg_rougeL_i2t"] == pytest.approx(np.mean([v for v in i2t_nd if v != 0]))
    assert record["ndcg_rougeL_t2i"] == pytest.approx(np.mean(t2i_nd))
    assert json.loads(json.dumps(record)) == record

    # Re-ranking: the shortlist is drawn within the subset's gallery
    align = rng.integers(0, 3, size=(n, n * per)).astype(np.float64)
    reranked = ev.evaluate_protocol(sims, ioc, protocol="vinvl_1k", rerank=(align, 2), images=subset)
    sub = np.ix_(subset, captions)
    sub_ioc = [subset.index(ioc[c]) for c in captions]
    slow_i2t, slow_t2i = naive_rerank_ranks(sims[sub], align[sub], sub_ioc, 2)
    assert reranked["i2t"] == ev.recall_summary(slow_i2t) and reranked["t2i"] == ev.recall_summary(slow_t2i)
    assert reranked["rerank_k"] == 2 and reranked["shortlist"] == {"i2t": 2, "t2i": 2}


def test_single_subset_of_the_first_fold_is_fold_0_and_the_order_does_not_matter():
    n, per = 8, 5
    ioc = shuffled_layout(n, per, seed=22)
    sims = torch.randn(n, n * per, generator=torch.Generator().manual_seed(23))
    folds = ev.evaluate_protocol(sims, ioc, fold_size=4, protocol="coco_1k_5fold")
    single = ev.evaluate_protocol(sims, ioc, protocol="vinvl_1k", images=[3, 0, 2, 1])
    assert {k: single[k] for k in ("n_images", "n_captions", "i2t", "t2i", "rsum")} == folds["folds"]["0"]
    other = ev.evaluate_protocol(sims, ioc, protocol="vinvl_1k", images=torch.tensor([5, 1, 6, 2]))
    assert other == ev.evaluate_protocol(sims, ioc, protocol="vinvl_1k", images=np.array([1, 2, 5, 6]))


def test_single_subset_is_checked():
    sims = torch.zeros(3, 6)
    with pytest.raises(ValueError, match="fold_size or images"):
        ev.evaluate_protocol(sims, None, fold_size=1, images=[0])
    with pytest.raises(ValueError, match="twice"):
        ev.evaluate_protocol(sims, None, images=[0, 0])
    with pytest.raises(ValueError, match=r"images must lie in \[0, 3\)"):
        ev.evaluate_protocol(sims, None, images=[3])
    with pytest.raises(ValueError, match="non-empty"):
        ev.evaluate_protocol(sims, None, images=[])


def test_key_rows_name_the_file_and_line_of_a_key_outside_the_split(tmp_path):
    from aladin.io import PipelineError

    path = tmp_path / data.SINGLE_1K_FILE
    assert data.key_rows(path, [40, 10, 30], [10, 20, 30, 40]).tolist() == [0, 2, 3]  # sorted: split order
    with pytest.raises(PipelineError, match=rf"{data.SINGLE_1K_FILE}:2: image id 25 is not an image of the test split"):
        data.key_rows(path, [40, 25, 30], [10, 20, 30, 40])
    with pytest.raises(PipelineError, match="no image id"):
        data.key_rows(path, [], [10])
