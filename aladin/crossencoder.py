"""The cost of a VinVL-style cross-encoder: one backbone forward per (caption, image) pair.

VinVL and Oscar score retrieval pairs jointly (`microsoft/Oscar oscar/run_retrieval.py`,
`--cross_image_eval`): the caption, the image's object tags and its regions go through BERT as ONE
sequence, [CLS] caption [SEP] tags [SEP] + regions, token types 0 for [CLS] caption [SEP] and 1 for
tags [SEP], and `ImageBertForSequenceClassification` scores the pair from the [CLS] output through the
pooler (dense + tanh) and a linear classifier. Nothing can be pre-computed: a text query against N images
costs N forwards (ALADIN.md 8), which is what ALADIN's "almost 90 times faster" is measured against.

This module builds those joint inputs from a split and times the forward on a sample of pairs. The
scoring weights are random (seeded): it measures cost, not accuracy. The backbone is ALADIN's own, so the
cross-encoder and the dual encoder run the same layers at the same width.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from .backbone import OscarBackbone
from .retrieval import percentile, synchronize
from .tokenization import ImageInputs, TextInputs


class CrossEncoder(nn.Module):
    """Backbone + Oscar's pooler and classifier on the [CLS] output; one score per pair."""

    def __init__(self, backbone: OscarBackbone, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, 1)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (self.pooler, self.classifier):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.02)
                layer.bias.zero_()

    def forward(self, pairs: "JointInputs") -> torch.Tensor:
        out = self.backbone.forward_image(pairs.input_ids, pairs.token_type_ids, pairs.attention_mask,
                                          pairs.img_feats)  # (B, W + R, H)
        return self.classifier(torch.tanh(self.pooler(out[:, 0])))[:, 0]  # (B,)


@dataclass
class JointInputs:
    input_ids: torch.Tensor  # (B, W) [CLS] caption [SEP] tags [SEP] [PAD]...
    token_type_ids: torch.Tensor  # (B, W) 0 caption part, 1 tag part, 0 padding
    attention_mask: torch.Tensor  # (B, W + R) 1 = attend
    img_feats: torch.Tensor  # (B, R, F)


def joint_inputs(texts: TextInputs, images: ImageInputs, captions: list[int], image_index: list[int],
                 max_length: int) -> JointInputs:
    """The cross-encoder's input for pairs (captions[b], image_index[b]) of a split.

    The caption row is [CLS] wordpieces [SEP] (`encode_captions`); the image row is tok0 tags [SEP]
    (`encode_images`), of which tok0 is dropped. The text part is cut at `max_length` (the backbone's
    position table); Oscar instead cuts caption and tags to 70 tokens longest-first.
    """
    width = texts.input_ids.shape[1]  # tag text width equals the caption width (max_seq_length)
    rows, types = [], []
    for c, i in zip(captions, image_index):
        cap = texts.input_ids[c, : int(texts.lengths[c])]  # (Lc,) [CLS] ... [SEP]
        tag_len = int(images.attention_mask[i, :width].sum())  # tok0 + tags + [SEP]
        tags = images.input_ids[i, 1:tag_len]  # (Lt,) tags [SEP]
        ids = torch.cat([cap, tags])[:max_length]
        rows.append(ids)
        types.append(torch.cat([torch.zeros_like(cap), torch.ones_like(tags)])[:max_length])
    w = max(len(r) for r in rows)
    device = texts.input_ids.device
    input_ids = torch.zeros(len(rows), w, dtype=torch.int64, device=device)  # [PAD] = 0
    token_type_ids = torch.zeros_like(input_ids)
    text_mask = torch.zeros_like(input_ids)
    for b, (ids, t) in enumerate(zip(rows, types)):
        input_ids[b, : len(ids)] = ids
        token_type_ids[b, : len(ids)] = t
        text_mask[b, : len(ids)] = 1
    index = torch.as_tensor(image_index, device=images.img_feats.device)
    region_mask = images.attention_mask[index, width:]  # (B, R)
    return JointInputs(input_ids, token_type_ids, torch.cat([text_mask, region_mask], dim=1),
                       images.img_feats[index])


@torch.inference_mode()
def time_crossencoder(model: CrossEncoder, texts: TextInputs, images: ImageInputs, n_pairs: int,
                      batch_size: int, seed: int = 0) -> dict:
    """Per-pair cost of the joint forward on random (caption, image) pairs, in batches.

    Inputs are built before the clock starts (collation is not the cost being compared); each batch is
    timed alone after one warm-up batch, and the per-pair time is the batch time / batch size.

    Returns:
        {"per_pair_ms" (median over batches), "per_pair_p95_ms", "pairs_per_s", "n_pairs", "batch_size",
        "mean_text_tokens", "regions"}.
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    caps = torch.randint(len(texts), (n_pairs,), generator=generator).tolist()
    imgs = torch.randint(len(images), (n_pairs,), generator=generator).tolist()
    max_length = model.backbone.config.max_position_embeddings
    batches = [joint_inputs(texts, images, caps[s: s + batch_size], imgs[s: s + batch_size], max_length)
               for s in range(0, n_pairs, batch_size)]
    device = batches[0].input_ids.device
    model(batches[0])  # warm-up
    per_pair = []
    for b in batches:
        synchronize(device)
        start = time.perf_counter()
        model(b)
        synchronize(device)
        per_pair.append((time.perf_counter() - start) * 1000.0 / b.input_ids.shape[0])
    median = statistics.median(per_pair)
    text_tokens = sum(int(b.attention_mask[:, : b.input_ids.shape[1]].sum()) for b in batches) / n_pairs
    return {"per_pair_ms": median, "per_pair_p95_ms": percentile(per_pair, 0.95),
            "pairs_per_s": 1000.0 / median, "n_pairs": n_pairs, "batch_size": batch_size,
            "mean_text_tokens": text_tokens, "regions": int(batches[0].img_feats.shape[1])}


def query_latency(timing: dict, gallery_size: int) -> dict:
    """A text query against `gallery_size` images: that many pair forwards (median and p95, ms)."""
    return {"median_ms": timing["per_pair_ms"] * gallery_size, "p95_ms": timing["per_pair_p95_ms"] * gallery_size,
            "gallery_size": gallery_size, "extrapolated_from_pairs": timing["n_pairs"]}
