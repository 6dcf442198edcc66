"""Encoding a gallery once and searching it with either head.

The matching head turns each image and caption into one unit vector, so search is a matrix product and
a top-k (exact kNN by inner product). The alignment head needs each item's whole token set and scores
every query token against every gallery token (brute force, chunked so memory stays bounded). Re-ranking
(beyond the paper; ALADIN.md 7.3) takes the matching head's k best items and re-scores only those with
the alignment head, so its cost is one kNN plus k fine-grained scores per query.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .model import Aladin, AlignmentSet, pad_sets
from .splits import SplitInputs
from .tokenization import ImageInputs, TextInputs


@dataclass
class EncodedSplit:
    img_emb: torch.Tensor  # (N_images, H) unit vectors (matching head)
    txt_emb: torch.Tensor  # (N_captions, H)
    img_set: AlignmentSet  # (N_images, R', H) for the alignment head
    txt_set: AlignmentSet  # (N_captions, W', H)


@torch.inference_mode()
def _encode(model: Aladin, inputs, batch_size: int, tokens, embed, alignment_set) -> tuple[torch.Tensor, AlignmentSet]:
    """Matching embeddings `(N, H)` and padded alignment sets `(N, L', H)` of one modality, batch by batch, in
    eval mode (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    emb, sets = [], []
    for start in range(0, len(inputs), batch_size):
        tok = tokens(inputs[start: start + batch_size])
        emb.append(embed(tok))
        sets.append(alignment_set(tok))
    model.train(was_training)
    return torch.cat(emb), pad_sets(sets)


def encode_images(model: Aladin, images: ImageInputs, batch_size: int) -> tuple[torch.Tensor, AlignmentSet]:
    """Matching embeddings `(N, H)` and alignment sets `(N, R', H)` of images."""
    return _encode(model, images, batch_size, model.image_tokens, model.embed_images, model.image_alignment_set)


def encode_texts(model: Aladin, texts: TextInputs, batch_size: int) -> tuple[torch.Tensor, AlignmentSet]:
    """Matching embeddings `(M, H)` and alignment sets `(M, W', H)` of captions."""
    return _encode(model, texts, batch_size, model.text_tokens, model.embed_texts, model.text_alignment_set)


def encode_split(model: Aladin, split: SplitInputs, batch_size: int) -> EncodedSplit:
    """Both branches of every image and caption, in eval mode, batch by batch."""
    img_emb, img_set = encode_images(model, split.images, batch_size)
    txt_emb, txt_set = encode_texts(model, split.texts, batch_size)
    return EncodedSplit(img_emb, txt_emb, img_set, txt_set)


def matching_similarities(enc: EncodedSplit) -> torch.Tensor:
    return enc.img_emb @ enc.txt_emb.T  # (N_images, N_captions), cosine


@torch.inference_mode()
def alignment_similarities(model: Aladin, enc: EncodedSplit, chunk_size: int) -> torch.Tensor:
    return model.alignment_scores(enc.img_set, enc.txt_set, chunk_size=chunk_size)  # (N_images, N_captions)


def split_to(split: SplitInputs, device: torch.device | str) -> SplitInputs:
    """The same split with its tensors on `device` (the gallery and queries of a GPU run)."""
    t, i = split.texts, split.images
    return SplitInputs(split.records,
                       ImageInputs(i.input_ids.to(device), i.token_type_ids.to(device), i.attention_mask.to(device),
                                   i.img_feats.to(device), i.lengths.to(device)),
                       TextInputs(t.input_ids.to(device), t.attention_mask.to(device), t.lengths.to(device)),
                       split.captions, split.image_of_caption)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def subset(s: AlignmentSet, index: torch.Tensor) -> AlignmentSet:
    return AlignmentSet(s.tokens[index], s.mask[index])  # (k, L', H)


@torch.inference_mode()
def rerank_t2i(model: Aladin, q_emb: torch.Tensor, q_set: AlignmentSet, enc: EncodedSplit, k: int,
               top_k: int, chunk_size: int) -> torch.Tensor:
    """Images for one caption query: matching-head top k, re-scored by the alignment head, best top_k."""
    shortlist = torch.topk(q_emb @ enc.img_emb.T, min(k, enc.img_emb.shape[0]), dim=1).indices[0]  # (k,)
    scores = model.alignment_scores(subset(enc.img_set, shortlist), q_set, chunk_size)[:, 0]  # (k,)
    return shortlist[torch.topk(scores, min(top_k, len(shortlist))).indices]


@torch.inference_mode()
def rerank_i2t(model: Aladin, q_emb: torch.Tensor, q_set: AlignmentSet, enc: EncodedSplit, k: int,
               top_k: int, chunk_size: int) -> torch.Tensor:
    """Captions for one image query, as `rerank_t2i`."""
    shortlist = torch.topk(q_emb @ enc.txt_emb.T, min(k, enc.txt_emb.shape[0]), dim=1).indices[0]  # (k,)
    scores = model.alignment_scores(q_set, subset(enc.txt_set, shortlist), chunk_size)[0]  # (k,)
    return shortlist[torch.topk(scores, min(top_k, len(shortlist))).indices]


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile (q in [0, 1]) of a non-empty list."""
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def _query_cases(model: Aladin, split: SplitInputs, enc: EncodedSplit, chunk_size: int, top_k: int,
                 rerank_k) -> dict:
    """{(mode, direction): (encode query i, search the gallery with the encoded query)}."""
    k_img = min(top_k, len(split.images))
    k_txt = min(top_k, len(split.texts))

    def text(i):
        return model.text_tokens(split.texts[i: i + 1])

    def image(i):
        return model.image_tokens(split.images[i: i + 1])

    cases = {
        ("matching", "t2i"): (lambda i: model.embed_texts(text(i)),
                              lambda q: torch.topk(q @ enc.img_emb.T, k_img, dim=1)),
        ("alignment", "t2i"): (lambda i: model.text_alignment_set(text(i)),
                               lambda q: torch.topk(model.alignment_scores(enc.img_set, q, chunk_size).T, k_img, dim=1)),
        ("matching", "i2t"): (lambda i: model.embed_images(image(i)),
                              lambda q: torch.topk(q @ enc.txt_emb.T, k_txt, dim=1)),
        ("alignment", "i2t"): (lambda i: model.image_alignment_set(image(i)),
                               lambda q: torch.topk(model.alignment_scores(q, enc.txt_set, chunk_size), k_txt, dim=1)),
    }
    # re-ranking: one backbone pass feeds both heads, the matching embedding for the shortlist and the
    # token set for re-scoring it
    def text_both(i):
        t = text(i)
        return model.embed_texts(t), model.text_alignment_set(t)

    def image_both(i):
        t = image(i)
        return model.embed_images(t), model.image_alignment_set(t)

    for k in rerank_k:
        cases[(f"rerank@{k}", "t2i")] = (text_both, lambda q, k=k: rerank_t2i(model, *q, enc, k, top_k, chunk_size))
        cases[(f"rerank@{k}", "i2t")] = (image_both, lambda q, k=k: rerank_i2t(model, *q, enc, k, top_k, chunk_size))
    return cases


@torch.inference_mode()
def measure_latency(model: Aladin, split: SplitInputs, enc: EncodedSplit, n_queries: int,
                    chunk_size: int, top_k: int = 10, rerank_k=(), directions=("t2i", "i2t")) -> dict:
    """Per-query latency of text-to-image and image-to-text search with each head.

    The gallery is encoded beforehand (`enc`), as a deployed index would be; each query is then encoded
    alone (batch of one) and searched against the whole gallery. `median_ms`/`p95_ms` include the query
    encoding; `encode_median_ms` is the encoding alone and `search_median_ms`/`search_p95_ms` the search
    alone (scoring plus top-k), where the heads differ most. Modes: `matching` (kNN), `alignment` (brute
    force, `chunk_size` gallery items per block) and `rerank@k` for each k in `rerank_k`. The model, the
    split and `enc` must be on one device; GPU work is synchronised before every clock read.
    """
    model.eval()
    device = enc.img_emb.device
    cases = _query_cases(model, split, enc, chunk_size, top_k, rerank_k)
    result = {}
    for (mode, direction), (encode, search) in cases.items():
        if direction not in directions:
            continue
        n = min(n_queries, len(split.texts) if direction == "t2i" else len(split.images))
        search(encode(0))  # warm-up: first-call allocations are not part of a query's cost
        total, encoding, searching = [], [], []
        for i in range(n):
            synchronize(device)
            start = time.perf_counter()
            q = encode(i)
            synchronize(device)
            middle = time.perf_counter()
            search(q)
            synchronize(device)
            end = time.perf_counter()
            total.append((end - start) * 1000.0)
            encoding.append((middle - start) * 1000.0)
            searching.append((end - middle) * 1000.0)
        result.setdefault(mode, {})[direction] = {
            "median_ms": statistics.median(total), "p95_ms": percentile(total, 0.95),
            "encode_median_ms": statistics.median(encoding),
            "search_median_ms": statistics.median(searching), "search_p95_ms": percentile(searching, 0.95),
            "n_queries": n}
    if {"t2i", "i2t"} <= set(directions):
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
