"""aladin.ndcg against hand-computed cases and plain-Python double loops (ties, tiers, long captions)."""
import math
import random

import numpy as np
import pytest

from aladin import ndcg

WORDS = "a the dog cat sits on in red blue runs big small".split()


def test_tokens_and_lcs_by_hand():
    assert ndcg.rouge_tokens("A dog, running.  Fast!") == ["a", "dog", "running", "fast"]
    assert ndcg.lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (BCBA)
    assert ndcg.lcs_length([], [1, 2]) == 0
    assert ndcg.lcs_length([1, 2, 3], [3, 2, 1]) == 1


def test_rouge_l_takes_max_precision_and_max_recall_over_references():
    # candidate a b c; references "a c" (LCS 2) and "b c d e" (LCS 2): P = max(2/3, 2/3), R = max(2/2, 2/4)
    p, r, beta2 = 2 / 3, 1.0, 1.2 ** 2
    expected = (1 + beta2) * p * r / (r + beta2 * p)
    assert ndcg.rouge_l(list("abc"), [list("ac"), list("bcde")]) == pytest.approx(expected, abs=1e-12)
    assert ndcg.rouge_l(list("abc"), [list("xyz")]) == 0.0
    assert ndcg.rouge_l([], [list("abc")]) == 0.0
    assert ndcg.rouge_l(list("ab"), [list("ab")]) == pytest.approx(1.0)


def random_captions(rng, n, long_every=0):
    caps = []
    for i in range(n):
        length = 70 if long_every and i % long_every == 0 else rng.randint(0, 12)
        caps.append(" ".join(rng.choice(WORDS) for _ in range(length)) + rng.choice(["", ".", " !"]))
    return caps


@pytest.mark.parametrize("block", [5, 512])
def test_relevance_matrix_matches_naive_double_loop(block):
    rng = random.Random(0)
    n_images = 7
    ioc = np.array([rng.randrange(n_images) for _ in range(30)] + list(range(n_images)))  # every image has one
    captions = random_captions(rng, len(ioc), long_every=11)  # some longer than one 64-bit word
    captions[3] = ""  # an empty caption: relevance 0 everywhere
    got = ndcg.rouge_l_relevance(captions, ioc, n_images, block=block)
    tokens = [ndcg.rouge_tokens(c) for c in captions]
    naive = np.array([[ndcg.rouge_l(tokens[q], [tokens[c] for c in range(len(ioc)) if ioc[c] == j])
                       for j in range(n_images)] for q in range(len(ioc))])
    assert got.shape == (len(ioc), n_images) and got.dtype == np.float32
    np.testing.assert_allclose(got, naive, atol=1e-6)
    assert (got[3] == 0).all()
    own = np.array([got[q, ioc[q]] for q in range(len(ioc)) if tokens[q]])
    np.testing.assert_allclose(own, 1.0, atol=1e-6)  # a caption is one of its own image's references


def test_relevance_names_an_image_without_references():
    with pytest.raises(ValueError, match="image 1 has no reference"):
        ndcg.rouge_l_relevance(["a", "b"], [0, 0], n_images=2)


def naive_ndcg(scores, rel, k, tier=None):
    """Sort each row by (tier desc, score desc, relevance asc) with Python's sort; TERAN's DCG formula."""
    out = []
    for q in range(len(scores)):
        t = tier[q] if tier is not None else [0] * len(scores[q])
        order = sorted(range(len(scores[q])), key=lambda j: (-int(t[j]), -scores[q][j], rel[q][j]))
        dcg = sum((2 ** rel[q][j] - 1) / math.log2(p + 2) for p, j in enumerate(order[:k]))
        ideal = sorted(rel[q], reverse=True)[:k]
        idcg = sum((2 ** r - 1) / math.log2(p + 2) for p, r in enumerate(ideal))
        out.append(dcg / idcg if idcg > 0 else 0.0)
    return np.array(out)


def test_ndcg_by_hand():
    # ranking 0, 1, 2 (rel 0, 1, 0.5), k = 2: DCG = 0 + 1 / log2 3; IDCG = 1 + (sqrt 2 - 1) / log2 3
    got = ndcg.ndcg_per_query([[3.0, 2.0, 1.0]], [[0.0, 1.0, 0.5]], k=2)
    expected = (1 / math.log2(3)) / (1 + (math.sqrt(2) - 1) / math.log2(3))
    assert got.tolist() == [pytest.approx(expected)]
    # tied scores rank the less relevant item first: items 0 and 1 tie, item 0 is less relevant
    tie = ndcg.ndcg_per_query([[1.0, 1.0, 0.0]], [[0.2, 1.0, 0.0]], k=1)
    assert tie.tolist() == [pytest.approx((2 ** 0.2 - 1) / 1.0)]
    # nothing relevant: 0, not NaN
    assert ndcg.ndcg_per_query([[1.0, 0.0]], [[0.0, 0.0]]).tolist() == [0.0]


@pytest.mark.parametrize("seed", range(4))
def test_ndcg_matches_naive_with_ties_and_tiers(seed):
    rng = np.random.default_rng(seed)
    q, g = 9, 40
    scores = rng.integers(0, 5, size=(q, g)).astype(np.float64)  # heavy ties, also across the top-k edge
    rel = np.round(rng.random((q, g)), 1) * (rng.random((q, g)) < 0.6)  # tied relevances and zeros
    rel[0] = 0.0
    for k in (1, 7, 25, 100):  # 100 > g: capped
        np.testing.assert_allclose(ndcg.ndcg_per_query(scores, rel, k), naive_ndcg(scores, rel, k), atol=1e-12)
        tier = rng.random((q, g)) < 0.15
        tier[1] = False
        tier[2] = True
        np.testing.assert_allclose(ndcg.ndcg_per_query(scores, rel, k, tier=tier, block=4),  # 3 blocks of queries
                                   naive_ndcg(scores, rel, k, tier), atol=1e-12)


def test_direction_means_follow_teran():
    per_query = np.array([0.0, 0.5, 1.0, 0.0])
    assert ndcg.mean_ndcg_i2t(per_query) == 0.75  # image queries: non-zero only
    assert ndcg.mean_ndcg_t2i(per_query) == 0.375  # caption queries: all
    assert ndcg.mean_ndcg_i2t(np.zeros(3)) == 0.0
