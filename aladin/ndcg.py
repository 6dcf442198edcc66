"""NDCG@25 with ROUGE-L relevance (ALADIN.md section 7.6; TERAN's protocol, always 0 in ALADIN's code).

Relevance of image j for caption q is ROUGE-L of q (the candidate) against image j's reference captions:
with LCS the longest common subsequence of tokens, P = max_r LCS(q, r) / |q| and R = max_r LCS(q, r) / |r|
over the references r (the two maxima may come from different references), and

    rel = (1 + beta^2) P R / (R + beta^2 P),  beta = 1.2,  0 when P or R is 0

(mesnico/TERAN `evaluate_utils/rouge.py`, from pycocoevalcap). A caption's own image has relevance 1: the
caption is one of its references. Tokens are the lower-cased runs of letters and digits, so punctuation
and spacing do not change a word ("dog." = "dog"); TERAN splits on single spaces instead.

Speed: the relevance matrix needs LCS(q, r) for every pair of captions of the split (2,500^2 for the
embedded test split, 25,000^2 for COCO 5K). A Python double loop is minutes to hours; here the bit-
parallel LCS of Allison and Dix (1986) in Hyyro's formulation runs on all pairs of a block at once:
one uint64 word per pair holds the DP row of a query of at most 64 tokens, and each reference token costs
five array operations. Longer queries fall back to the plain DP (`lcs_length`).

NDCG@k (TERAN `evaluate_utils/dcg.py`): DCG = sum_{p<k} (2^rel_p - 1) / log2(p + 2) over the top k of the
ranking, IDCG the same over the relevances sorted descending, NDCG = DCG / IDCG (0 when IDCG = 0).
Items that score the same are ranked lowest relevance first: a pessimistic rule, like the recall ties in
`aladin.evaluation`, and independent of item order.

SPICE relevance needs the SPICE 1.0 jar and Stanford CoreNLP models (Java), which this pipeline does
not run; it is reported as absent (`SPICE_ABSENT`), never as 0.
"""
from __future__ import annotations

import re

import numpy as np

BETA = 1.2
RANK = 25  # NDCG@25, TERAN's `DCG(rank=25)`
SPICE_ABSENT = ("absent: SPICE relevance needs the SPICE 1.0 jar and Stanford CoreNLP models (Java), "
                "which this pipeline does not run")
_WORD = re.compile(r"[a-z0-9]+")
_WORD_BITS = 64  # query tokens one uint64 word holds


# ---------------------------------------------------------------------------------------------------
# ROUGE-L


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: 'A dog, running.' -> ['a', 'dog', 'running']."""
    return _WORD.findall(text.lower())


def lcs_length(a, b) -> int:
    """Length of the longest common subsequence of two sequences (the plain O(|a| |b|) DP)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: list, references: list[list]) -> float:
    """ROUGE-L F (beta 1.2) of a token list against reference token lists, max precision and max recall.

    An empty candidate or reference has precision or recall 0 (pycocoevalcap would divide by zero).
    """
    prec = max((lcs_length(r, candidate) / len(candidate) if candidate else 0.0) for r in references)
    rec = max((lcs_length(r, candidate) / len(r) if r else 0.0) for r in references)
    return _f_measure(prec, rec)


def _f_measure(prec, rec):
    """Scalar or elementwise ROUGE-L F; 0 where precision or recall is 0."""
    prec, rec = np.asarray(prec, dtype=np.float64), np.asarray(rec, dtype=np.float64)
    both = (prec > 0) & (rec > 0)
    denom = np.where(both, rec + BETA ** 2 * prec, 1.0)
    f = np.where(both, (1 + BETA ** 2) * prec * rec / denom, 0.0)
    return float(f) if f.ndim == 0 else f


def _token_ids(captions: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """int32 `[M, Lmax]` token ids padded with V (= the vocabulary size), lengths `[M]`, and V."""
    tokens = [rouge_tokens(c) for c in captions]
    vocab: dict[str, int] = {}
    for t in tokens:
        for w in t:
            vocab.setdefault(w, len(vocab))
    width = max([len(t) for t in tokens] + [1])
    ids = np.full((len(tokens), width), len(vocab), dtype=np.int32)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = [vocab[w] for w in t]
    return ids, np.array([len(t) for t in tokens], dtype=np.int64), len(vocab)


def _match_masks(ids: np.ndarray, lengths: np.ndarray, n_vocab: int) -> np.ndarray:
    """uint64 `[Q, V + 1]`: bit t of [q, w] is set where query q has word w at position t (< 64).

    Column V (the padding id) stays 0, so a padded reference position leaves the DP row unchanged.
    """
    masks = np.zeros((ids.shape[0], n_vocab + 1), dtype=np.uint64)
    q, t = np.nonzero(np.arange(ids.shape[1])[None, :] < np.minimum(lengths, _WORD_BITS)[:, None])
    np.bitwise_or.at(masks, (q, ids[q, t]), np.left_shift(np.uint64(1), t.astype(np.uint64)))
    return masks


def _lcs_block(masks: np.ndarray, ref_ids: np.ndarray) -> np.ndarray:
    """int64 `[Q, R]` LCS lengths of Q queries (as match masks) against R references `[R, Lr]`.

    Hyyro's bit-vector LCS: V starts all ones; per reference token b, U = V & PM[b] and
    V = (V + U) | (V - U) (mod 2^64); LCS = number of zero bits of V. Bits at or above the query
    length stay 1 (a carry into them wraps out of the word), so counting zeros over all 64 bits is exact.
    """
    v = np.full((masks.shape[0], ref_ids.shape[0]), np.iinfo(np.uint64).max, dtype=np.uint64)  # (Q, R)
    for t in range(ref_ids.shape[1]):
        u = v & masks[:, ref_ids[:, t]]  # (Q, R)
        v = (v + u) | (v - u)
    return _WORD_BITS - np.bitwise_count(v).astype(np.int64)


def rouge_l_relevance(captions: list[str], image_of_caption, n_images: int | None = None,
                      block: int = 512) -> np.ndarray:
    """float32 `[M, N]` ROUGE-L relevance of every caption (row) for every image (column).

    Image j's references are the captions c with image_of_caption[c] == j, i.e. the split's captions,
    including the query itself for its own image. `block` bounds memory to block^2 words per step.
    """
    ioc = np.asarray(image_of_caption, dtype=np.int64)
    if ioc.shape != (len(captions),):
        raise ValueError(f"image_of_caption must give one image per caption ({len(captions)}), got {ioc.shape}")
    n_images = int(ioc.max()) + 1 if n_images is None else n_images
    if len(captions) == 0 or ioc.min() < 0 or ioc.max() >= n_images:
        raise ValueError(f"image_of_caption values must lie in [0, {n_images})")
    counts = np.bincount(ioc, minlength=n_images)
    if (counts == 0).any():
        raise ValueError(f"image {int(np.argmin(counts))} has no reference caption")
    ids, lengths, n_vocab = _token_ids(captions)
    by_image = np.argsort(ioc, kind="stable")  # references grouped per image, images in order
    ref_ids, ref_len, ref_img = ids[by_image], lengths[by_image], ioc[by_image]
    m = len(captions)
    out = np.zeros((m, n_images), dtype=np.float32)
    long_queries = np.flatnonzero(lengths > _WORD_BITS)
    for q0 in range(0, m, block):
        masks = _match_masks(ids[q0: q0 + block], lengths[q0: q0 + block], n_vocab)  # (Qb, V + 1)
        q_len = lengths[q0: q0 + block, None].astype(np.float64)  # (Qb, 1)
        # reference blocks end on image boundaries so every image's maxima come from one block
        r0 = 0
        while r0 < m:
            r1 = min(m, r0 + block)
            while r1 < m and ref_img[r1] == ref_img[r1 - 1]:
                r1 += 1
            width = max(1, int(ref_len[r0:r1].max()))
            lcs = _lcs_block(masks, ref_ids[r0:r1, :width]).astype(np.float64)  # (Qb, Rb)
            prec = np.divide(lcs, q_len, out=np.zeros_like(lcs), where=q_len > 0)
            r_len = ref_len[None, r0:r1].astype(np.float64)
            rec = np.divide(lcs, r_len, out=np.zeros_like(lcs), where=r_len > 0)
            starts = np.flatnonzero(np.r_[True, ref_img[r0 + 1:r1] != ref_img[r0:r1 - 1]])  # first ref per image
            images = ref_img[r0:r1][starts]
            out[q0: q0 + block, images] = _f_measure(np.maximum.reduceat(prec, starts, axis=1),
                                                     np.maximum.reduceat(rec, starts, axis=1))
            r0 = r1
    if len(long_queries):  # more than 64 tokens: one word cannot hold the DP row
        tokens = [list(row[:n]) for row, n in zip(ids, lengths)]
        refs = [[tokens[c] for c in np.flatnonzero(ioc == j)] for j in range(n_images)]
        for q in long_queries:
            out[q] = [rouge_l(tokens[q], refs[j]) for j in range(n_images)]
    return out


# ---------------------------------------------------------------------------------------------------
# NDCG


def _ordered_top(values: np.ndarray, rel: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k items per row, best first: value descending, then relevance ascending.

    `values` may hold -inf for items that must not be chosen. Returns (indices `[Q, k]`, n_valid `[Q]`):
    row q's first n_valid entries are its finite-valued top items in order; the rest are filler.
    """
    n_rows, n_items = values.shape
    rows = np.arange(n_rows)[:, None]
    part = np.argpartition(-values, k - 1, axis=1)[:, :k]  # (Q, k) the top k, ties at the edge arbitrary
    kth = values[rows, part].min(axis=1)  # (Q,) the k-th largest value
    above = values > kth[:, None]  # (Q, G)
    at_edge = values == kth[:, None]
    need = k - above.sum(axis=1)  # how many items scoring exactly kth belong to the top k
    for q in np.flatnonzero((at_edge.sum(axis=1) > need) & np.isfinite(kth)):
        # a tie across the edge: the least relevant of the tied items go in (rare with real scores)
        tied = np.flatnonzero(at_edge[q])
        chosen = tied[np.argsort(rel[q, tied], kind="stable")[: need[q]]]
        part[q] = np.concatenate([np.flatnonzero(above[q]), chosen])
    order = np.lexsort((rel[rows, part], -values[rows, part]), axis=1)  # (Q, k)
    top = part[rows, order]
    return top, np.minimum(k, np.isfinite(values).sum(axis=1))


def _dcg(gains_rel: np.ndarray) -> np.ndarray:
    """DCG of relevances already in rank order, `[Q, k]` -> `[Q]`."""
    discounts = np.log2(np.arange(gains_rel.shape[1]) + 2.0)
    return ((np.power(2.0, gains_rel) - 1.0) / discounts).sum(axis=1)


def ndcg_per_query(scores, relevance, k: int = RANK, tier=None, block: int = 1024) -> np.ndarray:
    """float64 `[Q]`: NDCG@k of each query row's ranking of the G items (columns).

    Args:
        scores: `[Q, G]` higher = better.
        relevance: `[Q, G]` graded relevance (e.g. `rouge_l_relevance`, oriented query x item).
        k: cut-off; capped at G.
        tier: optional bool `[Q, G]`; items with True rank above every False item, each group by score
            (the re-ranking mode: the shortlist, re-scored, above the rest in the first-stage order).
        block: queries per step, so that COCO 5K (5,000 x 25,000) never needs float64 copies of it all.
    """
    scores, relevance = np.asarray(scores), np.asarray(relevance)
    if scores.shape != relevance.shape or scores.ndim != 2:
        raise ValueError(f"scores and relevance must be [Q, G] of one shape, got {scores.shape} and {relevance.shape}")
    if tier is not None and np.shape(tier) != scores.shape:
        raise ValueError(f"tier must have the shape of scores {scores.shape}, got {np.shape(tier)}")
    k = min(k, scores.shape[1])
    out = np.empty(scores.shape[0])
    for q0 in range(0, scores.shape[0], block):
        rows = slice(q0, q0 + block)
        out[rows] = _ndcg_block(scores[rows].astype(np.float64), relevance[rows].astype(np.float64), k,
                                None if tier is None else np.asarray(tier[rows], dtype=bool))
    return out


def _ndcg_block(scores: np.ndarray, rel: np.ndarray, k: int, tier: np.ndarray | None) -> np.ndarray:
    rows = np.arange(scores.shape[0])[:, None]
    if tier is None:
        top, _ = _ordered_top(scores, rel, k)
        ranked = rel[rows, top]  # (Q, k)
    else:
        top1, n1 = _ordered_top(np.where(tier, scores, -np.inf), rel, k)
        top0, _ = _ordered_top(np.where(tier, -np.inf, scores), rel, k)
        both = np.concatenate([rel[rows, top1], rel[rows, top0]], axis=1)  # (Q, 2k)
        p = np.arange(k)[None, :]
        ranked = both[rows, np.where(p < n1[:, None], p, k + p - n1[:, None])]  # the shortlist, then the rest
    ideal = -np.sort(-np.partition(rel, rel.shape[1] - k, axis=1)[:, rel.shape[1] - k:], axis=1)  # (Q, k)
    best = _dcg(ideal)
    return np.divide(_dcg(ranked), best, out=np.zeros_like(best), where=best > 0)


def mean_ndcg_i2t(per_query: np.ndarray) -> float:
    """Image queries: the mean over queries with non-zero NDCG (TERAN `evaluation.py` i2t); 0 if none."""
    nonzero = per_query[per_query != 0]
    return float(nonzero.mean()) if nonzero.size else 0.0


def mean_ndcg_t2i(per_query: np.ndarray) -> float:
    """Caption queries: the mean over all queries (TERAN `evaluation.py` t2i)."""
    return float(per_query.mean())
