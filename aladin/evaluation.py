"""Retrieval metrics of a similarity matrix (ALADIN.md sections 7.4 and 7.5).

Every `sims` here is `[N, M]`: N images on rows, M captions on columns (torch tensor or numpy array).
`image_of_caption[c]` is the image that caption c describes; when it is None the captions are grouped
per image in order, M // N each (caption c belongs to image c // (M // N), the COCO layout).

Definitions (mesnico/ALADIN `alad/recall_auxiliary.py`, same as TERAN `evaluation.py`):

- i2t rank of image i: the best (smallest) 0-based rank among its captions in the ranking of all M
  captions by sims[i].
- t2i rank of caption c: the 0-based rank of its image among the N images by sims[:, c].
- R@K = 100 x fraction of queries with rank < K; medr = floor(median rank) + 1; meanr = mean rank + 1.

Ties go AGAINST the positive: a negative that scores exactly as high as the positive ranks above it.
The original ranks with argsort, which breaks ties in an arbitrary order. Ties are not hypothetical
here: with the original zero-fill (quirk Q7) a collapsed alignment head scores every pair exactly 0,
and a rule that favoured the positive would report it as perfect. This rule gives such a model the
worst rank instead, and it is deterministic and independent of caption order.
"""
from __future__ import annotations

import math

import numpy as np

KS = (1, 5, 10)


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


def i2t_ranks(sims, image_of_caption=None) -> np.ndarray:
    """int64 `[N]`: for each image, the best 0-based rank among its captions (ties go against it)."""
    sims = _as_sims(sims)
    n_images, n_captions = sims.shape
    ioc = _as_image_of_caption(image_of_caption, n_images, n_captions)
    positive = sims[ioc, np.arange(n_captions)]  # (M,), score of each caption with its own image
    best = np.full(n_images, -np.inf, dtype=sims.dtype)  # (N,)
    np.maximum.at(best, ioc, positive)  # best-scored own caption per image
    # The best-ranked positive is the best-scored one; foreign captions scoring at least as high rank
    # above it (no own caption scores strictly higher, by definition of `best`).
    foreign = ioc[None, :] != np.arange(n_images)[:, None]  # (N, M)
    return ((sims >= best[:, None]) & foreign).sum(axis=1).astype(np.int64)  # (N,)


def t2i_ranks(sims, image_of_caption=None) -> np.ndarray:
    """int64 `[M]`: for each caption, the 0-based rank of its image among the N images (ties go against it)."""
    sims = _as_sims(sims)
    n_images, n_captions = sims.shape
    ioc = _as_image_of_caption(image_of_caption, n_images, n_captions)
    positive = sims[ioc, np.arange(n_captions)]  # (M,)
    # Every image scoring at least as high, minus the caption's own image (which always does).
    return ((sims >= positive[None, :]).sum(axis=0) - 1).astype(np.int64)  # (M,)


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


def _record(sims: np.ndarray, ioc: np.ndarray) -> dict:
    i2t_m = recall_summary(i2t_ranks(sims, ioc))
    t2i_m = recall_summary(t2i_ranks(sims, ioc))
    return {"n_images": int(sims.shape[0]), "n_captions": int(sims.shape[1]), "i2t": i2t_m, "t2i": t2i_m,
            "rsum": rsum(i2t_m, t2i_m), "chance": chance_metrics(ioc, sims.shape[0])}


def _mean_of(records: list[dict], key: str) -> dict:
    return {name: float(np.mean([r[key][name] for r in records])) for name in records[0][key]}


def evaluate_protocol(sims, image_of_caption=None, fold_size: int | None = None, protocol: str = "coco_5k") -> dict:
    """One metrics record (DVC_AND_NOTEBOOKS.md 9.2) for a retrieval protocol (ALADIN.md 7.5).

    Without `fold_size`: the whole matrix, n_folds 1. With `fold_size`: images are split in order into
    floor(N / fold_size) folds (trailing images that fill no fold are left out); fold f scores images
    f*fold_size .. (f+1)*fold_size - 1 against their own captions only (the sub-matrix), as TERAN's
    `evalrank(fold5=True)`. Top-level metrics are then the means over folds, rsum is recomputed from the
    averaged recalls (= the mean of the fold rsums), `n_images` and `n_captions` are per fold (the mean
    when folds differ in caption count), and "folds" holds each fold's record keyed "0", "1", ... (an
    object, because DVC drops lists).

    Returns:
        {"protocol", "n_images", "n_captions", "n_folds", "i2t", "t2i", "rsum", "chance"[, "folds"]};
        chance = expected R@K and rsum of a uniformly random ranking. Python floats and ints only.
    """
    sims = _as_sims(sims)
    n_images, n_captions = sims.shape
    ioc = _as_image_of_caption(image_of_caption, n_images, n_captions)
    if fold_size is None:
        return {"protocol": protocol, "n_folds": 1, **_record(sims, ioc)}

    if not isinstance(fold_size, int) or isinstance(fold_size, bool) or not 1 <= fold_size <= n_images:
        raise ValueError(f"fold_size must be an integer in [1, {n_images}] (the number of images), got {fold_size!r}")
    n_folds = n_images // fold_size
    folds = []
    for f in range(n_folds):
        first = f * fold_size
        captions = np.flatnonzero((ioc >= first) & (ioc < first + fold_size))  # (m_f,), original order
        folds.append(_record(sims[first:first + fold_size][:, captions], ioc[captions] - first))

    i2t_m, t2i_m = _mean_of(folds, "i2t"), _mean_of(folds, "t2i")
    chance_i2t, chance_t2i = _mean_of([r["chance"] for r in folds], "i2t"), _mean_of([r["chance"] for r in folds], "t2i")
    mean_captions = float(np.mean([r["n_captions"] for r in folds]))
    return {
        "protocol": protocol,
        "n_images": fold_size,
        "n_captions": int(mean_captions) if mean_captions.is_integer() else mean_captions,
        "n_folds": n_folds,
        "i2t": i2t_m,
        "t2i": t2i_m,
        "rsum": rsum(i2t_m, t2i_m),
        "chance": {"i2t": chance_i2t, "t2i": chance_t2i, "rsum": rsum(chance_i2t, chance_t2i)},
        "folds": {str(f): {k: r[k] for k in ("n_images", "n_captions", "i2t", "t2i", "rsum")}
                  for f, r in enumerate(folds)},
    }
