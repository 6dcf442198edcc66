"""Encoding a gallery once and searching it with either head.

The matching head turns each image and caption into one unit vector, so search is a matrix product and
a top-k (exact kNN by inner product). The alignment head needs each item's whole token set and scores
every query token against every gallery token (brute force, chunked so memory stays bounded).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .model import Aladin, AlignmentSet, pad_sets
from .splits import SplitInputs


@dataclass
class EncodedSplit:
    img_emb: torch.Tensor  # (N_images, H) unit vectors (matching head)
    txt_emb: torch.Tensor  # (N_captions, H)
    img_set: AlignmentSet  # (N_images, R', H) for the alignment head
    txt_set: AlignmentSet  # (N_captions, W', H)


@torch.inference_mode()
def encode_split(model: Aladin, split: SplitInputs, batch_size: int) -> EncodedSplit:
    """Both branches of every image and caption, in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    img_emb, txt_emb, img_sets, txt_sets = [], [], [], []
    n_img, n_txt = len(split.images), len(split.texts)
    for start in range(0, max(n_img, n_txt), batch_size):
        img = split.images[start: start + batch_size] if start < n_img else None
        txt = split.texts[start: start + batch_size] if start < n_txt else None
        img_tok = model.image_tokens(img) if img is not None else None
        txt_tok = model.text_tokens(txt) if txt is not None else None
        if img_tok is not None:
            img_emb.append(model.embed_images(img_tok))
            img_sets.append(model.image_alignment_set(img_tok))
        if txt_tok is not None:
            txt_emb.append(model.embed_texts(txt_tok))
            txt_sets.append(model.text_alignment_set(txt_tok))
    model.train(was_training)
    return EncodedSplit(torch.cat(img_emb), torch.cat(txt_emb), pad_sets(img_sets), pad_sets(txt_sets))


def matching_similarities(enc: EncodedSplit) -> torch.Tensor:
    return enc.img_emb @ enc.txt_emb.T  # (N_images, N_captions), cosine


@torch.inference_mode()
def alignment_similarities(model: Aladin, enc: EncodedSplit, chunk_size: int) -> torch.Tensor:
    return model.alignment_scores(enc.img_set, enc.txt_set, chunk_size=chunk_size)  # (N_images, N_captions)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


@torch.inference_mode()
def measure_latency(model: Aladin, split: SplitInputs, enc: EncodedSplit, n_queries: int,
                    chunk_size: int, top_k: int = 10) -> dict:
    """Per-query latency of text-to-image and image-to-text search with each head.

    The gallery is encoded beforehand (`enc`), as a deployed index would be; each query is then encoded
    alone (batch of one) and searched against the whole gallery. `median_ms`/`p95_ms` include the query
    encoding; `search_median_ms` is the search alone (scoring plus top-k), where the heads differ most.
    """
    model.eval()
    n_txt = min(n_queries, len(split.texts))
    n_img = min(n_queries, len(split.images))
    k_img = min(top_k, len(split.images))
    k_txt = min(top_k, len(split.texts))
    # (encode query i, search the gallery with it) for each head and direction
    cases = {
        ("matching", "t2i"): (lambda i: model.embed_texts(model.text_tokens(split.texts[i: i + 1])),
                              lambda q: torch.topk(q @ enc.img_emb.T, k_img, dim=1)),
        ("alignment", "t2i"): (lambda i: model.text_alignment_set(model.text_tokens(split.texts[i: i + 1])),
                               lambda q: torch.topk(model.alignment_scores(enc.img_set, q, chunk_size).T, k_img, dim=1)),
        ("matching", "i2t"): (lambda i: model.embed_images(model.image_tokens(split.images[i: i + 1])),
                              lambda q: torch.topk(q @ enc.txt_emb.T, k_txt, dim=1)),
        ("alignment", "i2t"): (lambda i: model.image_alignment_set(model.image_tokens(split.images[i: i + 1])),
                               lambda q: torch.topk(model.alignment_scores(q, enc.txt_set, chunk_size), k_txt, dim=1)),
    }
    result = {"matching": {}, "alignment": {}}
    for (head, direction), (encode, search) in cases.items():
        n = n_txt if direction == "t2i" else n_img
        search(encode(0))  # warm-up: first-call allocations are not part of a query's cost
        total, searching = [], []
        for i in range(n):
            start = time.perf_counter()
            q = encode(i)
            middle = time.perf_counter()
            search(q)
            end = time.perf_counter()
            total.append((end - start) * 1000.0)
            searching.append((end - middle) * 1000.0)
        result[head][direction] = {"median_ms": statistics.median(total), "p95_ms": _percentile(total, 0.95),
                                   "search_median_ms": statistics.median(searching), "n_queries": n}
    result["speedup"] = {
        "alignment_over_matching": result["alignment"]["t2i"]["median_ms"] / result["matching"]["t2i"]["median_ms"],
        "alignment_over_matching_search": (result["alignment"]["t2i"]["search_median_ms"]
                                           / result["matching"]["t2i"]["search_median_ms"]),
        "alignment_over_matching_i2t": result["alignment"]["i2t"]["median_ms"] / result["matching"]["i2t"]["median_ms"],
    }
    return result


def top_images(similarities: torch.Tensor, caption_indices: list[int], k: int) -> list[list[int]]:
    """Indices of the k best images for each chosen caption (columns of an (N_images, N_captions) matrix)."""
    cols = similarities[:, caption_indices].T  # (Q, N_images)
    return torch.topk(cols, min(k, similarities.shape[0]), dim=1).indices.tolist()
