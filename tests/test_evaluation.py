"""aladin.evaluation against naive loops, hand-computed cases and exact/Monte-Carlo chance levels."""
import itertools
import json
from fractions import Fraction

import numpy as np
import pytest
import torch

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
