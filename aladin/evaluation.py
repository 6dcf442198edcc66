"""Retrieval metrics of a similarity matrix (ALADIN.md sections 7.4 and 7.5).

Protocols (`evaluate_protocol`, ALADIN.md 7.5): the whole matrix (`coco_5k`), the mean over sequential folds
(`coco_1k_5fold`), or one image subset evaluated once (`vinvl_1k`: the images of VinVL's `test_img_keys_1k.tsv`,
`SINGLE_1K_FILE` in the dataset folder, and their own captions).

Every `sims` here is `[N, M]`: N images on rows, M captions on columns (torch tensor or numpy array).
`image_of_caption[c]` is the image that caption c describes; when it is None the captions are grouped
per image in order, M // N each (caption c belongs to image c // (M // N), the COCO layout).

Definitions (mesnico/ALADIN `alad/recall_auxiliary.py`, same as TERAN `evaluation.py`):

- i2t rank of image i: the best (smallest) 0-based rank among its captions in the ranking of all M
  captions by sims[i].
- t2i rank of caption c: the 0-based rank of its image among the N images by sims[:, c].
- R@K = 100 x fraction of queries with rank < K; medr = floor(median rank) + 1; meanr = mean rank + 1.

Re-ranking (`rerank=(alignment_sims, k)` in `evaluate_protocol`; ALADIN.md 7.3 names it as an extension):
each query's k best items by the first-stage (matching) score form a shortlist, re-scored by the alignment
head and ranked above the rest, which keep their first-stage order. A ranking key is then (tier, score):
tier 1 for the shortlist, 0 elsewhere; `i2t_ranks`/`t2i_ranks` take the tier as an optional argument.
The shortlist holds every item scoring at least the k-th best score, so a tie at its edge lets in all
tied items (a deployed top-k would pick k of them arbitrarily).

Ties go AGAINST the positive: a negative that scores exactly as high as the positive ranks above it.
The original ranks with argsort, which breaks ties in an arbitrary order. Ties are not hypothetical
here: with the original zero-fill (quirk Q7) a collapsed alignment head scores every pair exactly 0,
and a rule that favoured the positive would report it as perfect. This rule gives such a model the
worst rank instead, and it is deterministic and independent of caption order.
"""
from __future__ import annotations

import math

import numpy as np

from .io import PipelineError
from .ndcg import RANK, SPICE_ABSENT, mean_ndcg_i2t, mean_ndcg_t2i, ndcg_per_query

KS = (1, 5, 10)
NDCG_KEYS = ("ndcg_rougeL_i2t", "ndcg_rougeL_t2i")


# ---------------------------------------------------------------------------------------------------
# Inputs


def _as_sims(sims) -> np.ndarray:
    if hasattr(sims, "detach"):  # a torch tensor, possibly on a GPU, requiring grad, or half precision
        sims = sims.detach().cpu()
        if sims.is_floating_point() and sims.element_size() < 4:
            sims = sims.float()  # numpy has no bfloat16; the widening is exact
        sims = sims.numpy()
    sims = np.asarray(sims)
    if sims.ndim != 2 or sims.shape[0] == 0 or sims.shape[1] == 0:
        raise ValueError(f"sims must be a non-empty [n_images, n_captions] matrix, got shape {sims.shape}")
    if not np.issubdtype(sims.dtype, np.floating):
        sims = sims.astype(np.float64)
    if not np.isfinite(sims).all():
        raise ValueError("sims contains NaN or infinite values")
    return sims


def _as_image_of_caption(image_of_caption, n_images: int, n_captions: int) -> np.ndarray:
    """int64 `[M]` image index per caption; checks that every image has at least one caption."""
    if image_of_caption is None:
        if n_captions % n_images:
            raise ValueError(f"without image_of_caption the number of captions ({n_captions}) must be a "
                             f"multiple of the number of images ({n_images})")
        return np.arange(n_captions, dtype=np.int64) // (n_captions // n_images)
    if hasattr(image_of_caption, "detach"):
        image_of_caption = image_of_caption.detach().cpu().numpy()
    ioc = np.asarray(image_of_caption)
    if ioc.shape != (n_captions,) or not np.issubdtype(ioc.dtype, np.integer):
        raise ValueError(f"image_of_caption must be {n_captions} integers (one per caption column), "
                         f"got shape {ioc.shape} of {ioc.dtype}")
    ioc = ioc.astype(np.int64)
    if ioc.min() < 0 or ioc.max() >= n_images:
        raise ValueError(f"image_of_caption values must lie in [0, {n_images}), got {ioc.min()} .. {ioc.max()}")
    counts = np.bincount(ioc, minlength=n_images)  # (N,)
    if (counts == 0).any():
        raise ValueError(f"image {int(np.argmin(counts))} has no caption in image_of_caption")
    return ioc


# ---------------------------------------------------------------------------------------------------
# Ranks and recalls


def _as_tier(tier, shape) -> np.ndarray | None:
    if tier is None:
        return None
    if hasattr(tier, "detach"):
        tier = tier.detach().cpu().numpy()
    tier = np.asarray(tier)
    if tier.shape != shape:
        raise ValueError(f"tier must have the shape of sims {shape}, got {tier.shape}")
    return tier.astype(np.int8)


def i2t_ranks(sims, image_of_caption=None, tier=None) -> np.ndarray:
    """int64 `[N]`: for each image, the best 0-based rank among its captions (ties go against it).

    `tier` (optional, `[N, M]`): the ranking key is (tier, sims), compared lexicographically.
    """
    sims = _as_sims(sims)
    n_images, n_captions = sims.shape
    ioc = _as_image_of_caption(image_of_caption, n_images, n_captions)
    tier = _as_tier(tier, sims.shape)
    cols = np.arange(n_captions)
    foreign = ioc[None, :] != np.arange(n_images)[:, None]  # (N, M)
    positive = sims[ioc, cols]  # (M,), score of each caption with its own image
    if tier is not None:
        own_tier = tier[ioc, cols]  # (M,)
        best_tier = np.full(n_images, -1, dtype=np.int8)  # (N,)
        np.maximum.at(best_tier, ioc, own_tier)
        # only own captions in the image's best tier compete for its best-ranked positive
        positive = np.where(own_tier == best_tier[ioc], positive, -np.inf)
    best = np.full(n_images, -np.inf, dtype=np.float64)  # (N,)
    np.maximum.at(best, ioc, positive)  # best-scored own caption per image
    # The best-ranked positive is the best-scored one; foreign captions scoring at least as high rank
    # above it (no own caption scores strictly higher, by definition of `best`).
    above = sims >= best[:, None]  # (N, M)
    if tier is not None:
        above = (tier > best_tier[:, None]) | ((tier == best_tier[:, None]) & above)
    return (above & foreign).sum(axis=1).astype(np.int64)  # (N,)


def t2i_ranks(sims, image_of_caption=None, tier=None) -> np.ndarray:
    """int64 `[M]`: for each caption, the 0-based rank of its image among the N images (ties go against it).

    `tier` (optional, `[N, M]`): the ranking key is (tier, sims), compared lexicographically.
    """
    sims = _as_sims(sims)
    n_images, n_captions = sims.shape
    ioc = _as_image_of_caption(image_of_caption, n_images, n_captions)
    tier = _as_tier(tier, sims.shape)
    cols = np.arange(n_captions)
    above = sims >= sims[ioc, cols][None, :]  # (N, M)
    if tier is not None:
        own_tier = tier[ioc, cols][None, :]  # (1, M)
        above = (tier > own_tier) | ((tier == own_tier) & above)
    # Every image ranking at least as high, minus the caption's own image (which always does).
    return (above.sum(axis=0) - 1).astype(np.int64)  # (M,)


def recall_summary(ranks) -> dict:
    """{"r1", "r5", "r10", "medr", "meanr"} of 0-based ranks, as Python floats (ALADIN.md 7.4)."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-d array, got shape {ranks.shape}")
    # count * 100 / n rather than 100 * mean: 3 of 5 gives exactly 60.0
    out = {f"r{k}": 100.0 * int((ranks < k).sum()) / ranks.size for k in KS}
    out["medr"] = float(math.floor(np.median(ranks)) + 1)
    out["meanr"] = float(np.mean(ranks) + 1)
    return out


def i2t(sims, image_of_caption=None) -> dict:
    """Image-to-text metrics: each image queries all captions."""
    return recall_summary(i2t_ranks(sims, image_of_caption))


def t2i(sims, image_of_caption=None) -> dict:
    """Text-to-image metrics: each caption queries all images."""
    return recall_summary(t2i_ranks(sims, image_of_caption))


def rsum(i2t_metrics: dict, t2i_metrics: dict) -> float:
    """R@1 + R@5 + R@10 of both directions (maximum 600)."""
    return float(sum(i2t_metrics[f"r{k}"] + t2i_metrics[f"r{k}"] for k in KS))


# ---------------------------------------------------------------------------------------------------
# Chance level


def chance_metrics(image_of_caption: np.ndarray, n_images: int) -> dict:
    """Expected R@K of a uniformly random ranking, exact (medr and meanr are left out).

    t2i: the image is at each of the N ranks with equal probability, R@K = 100 min(K, N) / N.
    i2t: an image with c of the M captions is missed by the top K with probability C(M-c, K) / C(M, K)
    (math.comb is 0 when K > M-c); averaged over the images.
    """
    ioc = np.asarray(image_of_caption)
    n_captions = len(ioc)
    counts = np.bincount(ioc, minlength=n_images)  # (N,) positives per image
    t2i_chance = {f"r{k}": 100.0 * min(k, n_images) / n_images for k in KS}
    i2t_chance = {}
    for k in KS:
        if k >= n_captions:
            i2t_chance[f"r{k}"] = 100.0  # the whole list is retrieved
            continue
        total = math.comb(n_captions, k)
        miss = {int(c): math.comb(n_captions - int(c), k) / total for c in np.unique(counts)}
        i2t_chance[f"r{k}"] = float(100.0 * np.mean([1.0 - miss[int(c)] for c in counts]))
    return {"i2t": i2t_chance, "t2i": t2i_chance, "rsum": rsum(i2t_chance, t2i_chance)}


# ---------------------------------------------------------------------------------------------------
# Protocols


def shortlist(sims: np.ndarray, k: int, axis: int) -> np.ndarray:
    """bool, the shape of `sims`: per query, the items scoring at least the query's k-th best score.

    axis 0: caption queries (columns) over images; axis 1: image queries (rows) over captions. k is
    capped at the gallery size; ties at the edge are all kept (see the module docstring).
    """
    k = min(k, sims.shape[axis])
    kth = -np.partition(-sims, k - 1, axis=axis).take([k - 1], axis=axis)  # (1, M) or (N, 1)
    return sims >= kth


def _record(sims: np.ndarray, ioc: np.ndarray, relevance: np.ndarray | None = None,
            rerank: tuple[np.ndarray, int] | None = None) -> dict:
    """Metrics of one gallery: `sims` `[N, M]`, relevance `[M, N]`, rerank = (alignment sims `[N, M]`, k)."""
    if rerank is None:
        keys = {"i2t": (sims, None), "t2i": (sims, None)}
    else:
        align, k = rerank
        keys = {}
        for direction, axis in (("i2t", 1), ("t2i", 0)):
            tier = shortlist(sims, k, axis)
            keys[direction] = (np.where(tier, align, sims), tier)  # the shortlist re-scored
    (i2t_v, i2t_tier), (t2i_v, t2i_tier) = keys["i2t"], keys["t2i"]
    i2t_m = recall_summary(i2t_ranks(i2t_v, ioc, tier=i2t_tier))
    t2i_m = recall_summary(t2i_ranks(t2i_v, ioc, tier=t2i_tier))
    out = {"n_images": int(sims.shape[0]), "n_captions": int(sims.shape[1]), "i2t": i2t_m, "t2i": t2i_m,
           "rsum": rsum(i2t_m, t2i_m), "chance": chance_metrics(ioc, sims.shape[0])}
    if relevance is not None:
        # image queries rank captions (rows of sims, relevance transposed); caption queries rank images
        out["ndcg_rougeL_i2t"] = mean_ndcg_i2t(ndcg_per_query(i2t_v, relevance.T, RANK, i2t_tier))
        out["ndcg_rougeL_t2i"] = mean_ndcg_t2i(ndcg_per_query(t2i_v.T, relevance, RANK,
                                                             None if t2i_tier is None else t2i_tier.T))
    if rerank is not None:
        out["shortlist"] = {"i2t": min(rerank[1], sims.shape[1]), "t2i": min(rerank[1], sims.shape[0])}
    return out


def _mean_of(records: list[dict], key: str) -> dict:
    return {name: float(np.mean([r[key][name] for r in records])) for name in records[0][key]}


def _as_relevance(relevance, n_images: int, n_captions: int) -> np.ndarray | None:
    if relevance is None:
        return None
    relevance = np.asarray(relevance)  # float32 from rouge_l_relevance: 0.5 GB for COCO 5K, kept as is
    if relevance.shape != (n_captions, n_images):
        raise ValueError(f"relevance must be [n_captions, n_images] = [{n_captions}, {n_images}], "
                         f"got shape {relevance.shape}")
    return relevance


def _as_images(images, n_images: int) -> np.ndarray:
    """int64 `[K]` distinct row indices of an image subset."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim != 1 or images.size == 0 or not np.issubdtype(images.dtype, np.integer):
        raise ValueError(f"images must be a non-empty 1-d array of image indices, got shape {images.shape} "
                         f"of {images.dtype}")
    images = images.astype(np.int64)
    if images.min() < 0 or images.max() >= n_images:
        raise ValueError(f"images must lie in [0, {n_images}), got {images.min()} .. {images.max()}")
    if len(np.unique(images)) != len(images):
        raise ValueError("images lists an image twice")
    return images


def _gallery(sims: np.ndarray, ioc: np.ndarray, images: np.ndarray, relevance: np.ndarray | None,
             align: np.ndarray | None, k: int | None) -> dict:
    """`_record` of the sub-matrix of `images` (rows, in the given order) and their own captions (columns,
    in their original order): captions of other images take no part, as in TERAN's folds."""
    row = np.full(sims.shape[0], -1, dtype=np.int64)  # (N,) image index -> its row in the sub-matrix
    row[images] = np.arange(len(images))
    captions = np.flatnonzero(row[ioc] >= 0)  # (m,)
    return _record(sims[images][:, captions], row[ioc[captions]],
                   None if relevance is None else relevance[captions][:, images],
                   None if align is None else (align[images][:, captions], k))


def evaluate_protocol(sims, image_of_caption=None, fold_size: int | None = None, protocol: str = "coco_5k",
                      relevance=None, rerank=None, images=None) -> dict:
    """One metrics record (DVC_AND_NOTEBOOKS.md 9.2) for a retrieval protocol (ALADIN.md 7.5).

    Without `fold_size` or `images`: the whole matrix, n_folds 1. With `images` (indices of a subset of
    the N images, e.g. those of VinVL's single 1K key file): that subset evaluated once, as one gallery of
    those images and their own captions only (the sub-matrix), n_folds 1. With `fold_size`: images are
    split in order into floor(N / fold_size) folds (trailing images that fill no fold are left out); fold f
    scores images f*fold_size .. (f+1)*fold_size - 1 against their own captions only (the sub-matrix), as
    TERAN's `evalrank(fold5=True)`. Top-level metrics are then the means over folds, rsum is recomputed
    from the averaged recalls (= the mean of the fold rsums), `n_images` and `n_captions` are per fold (the
    mean when folds differ in caption count), and "folds" holds each fold's record keyed "0", "1", ... (an
    object, because DVC drops lists).

    Args:
        relevance: optional `[M, N]` graded relevance of caption m for image n (`aladin.ndcg.
            rouge_l_relevance`): adds `ndcg_rougeL_i2t`/`ndcg_rougeL_t2i` (NDCG@25, per fold then the
            mean) and `ndcg_spice` = the reason it is absent.
        rerank: optional (alignment sims `[N, M]`, k): `sims` is then the first-stage (matching) score
            and each gallery's (fold's, subset's) k best items per query are re-scored by the alignment sims.
        images: optional `[K]` distinct image indices; excludes `fold_size`.

    Returns:
        {"protocol", "n_images", "n_captions", "n_folds", "i2t", "t2i", "rsum", "chance"[, "folds"]
        [, "ndcg_rougeL_i2t", "ndcg_rougeL_t2i", "ndcg_spice"][, "rerank_k", "shortlist"]};
        chance = expected R@K and rsum of a uniformly random ranking. Python floats and ints only.
    """
    sims = _as_sims(sims)
    n_images, n_captions = sims.shape
    ioc = _as_image_of_caption(image_of_caption, n_images, n_captions)
    relevance = _as_relevance(relevance, n_images, n_captions)
    align, k = None, None
    if rerank is not None:
        align, k = rerank
        align = _as_sims(align)
        if align.shape != sims.shape:
            raise ValueError(f"rerank scores must have the shape of sims {sims.shape}, got {align.shape}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"rerank k must be a positive integer, got {k!r}")
    extra = {}
    if relevance is not None:
        extra["ndcg_spice"] = SPICE_ABSENT
    if rerank is not None:
        extra["rerank_k"] = k
    if images is not None:
        if fold_size is not None:
            raise ValueError("give fold_size or images, not both")
        record = _gallery(sims, ioc, _as_images(images, n_images), relevance, align, k)
        return {"protocol": protocol, "n_folds": 1, **record, **extra}
    if fold_size is None:
        record = _record(sims, ioc, relevance, None if align is None else (align, k))
        return {"protocol": protocol, "n_folds": 1, **record, **extra}

    if not isinstance(fold_size, int) or isinstance(fold_size, bool) or not 1 <= fold_size <= n_images:
        raise ValueError(f"fold_size must be an integer in [1, {n_images}] (the number of images), got {fold_size!r}")
    n_folds = n_images // fold_size
    folds = [_gallery(sims, ioc, np.arange(f * fold_size, (f + 1) * fold_size), relevance, align, k)
             for f in range(n_folds)]

    i2t_m, t2i_m = _mean_of(folds, "i2t"), _mean_of(folds, "t2i")
    chance_i2t, chance_t2i = _mean_of([r["chance"] for r in folds], "i2t"), _mean_of([r["chance"] for r in folds], "t2i")
    mean_captions = float(np.mean([r["n_captions"] for r in folds]))
    out = {
        "protocol": protocol,
        "n_images": fold_size,
        "n_captions": int(mean_captions) if mean_captions.is_integer() else mean_captions,
        "n_folds": n_folds,
        "i2t": i2t_m,
        "t2i": t2i_m,
        "rsum": rsum(i2t_m, t2i_m),
        "chance": {"i2t": chance_i2t, "t2i": chance_t2i, "rsum": rsum(chance_i2t, chance_t2i)},
        "folds": {str(f): {key: r[key] for key in ("n_images", "n_captions", "i2t", "t2i", "rsum", *NDCG_KEYS)
                           if key in r}
                  for f, r in enumerate(folds)},
        **extra,
    }
    for key in NDCG_KEYS:
        if relevance is not None:
            out[key] = float(np.mean([r[key] for r in folds]))
    if align is not None:
        out["shortlist"] = folds[0]["shortlist"]  # equal sized folds: t2i equal; i2t per the first fold
    return out


# ---------------------------------------------------------------------------------------------------
# The single 1K key file
