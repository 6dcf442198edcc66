"""VinVL X152-C4 object + attribute detector: RPN on C4, res5 box head, box filters 1/2 (VINVL.md 2-4).

The trunk, the RoI pooler and the res5 head are `aladin.features`' (`VinVLDetector` IS a
`RegionFeatureExtractor`, so `features.features_for_boxes` also runs on it). Added here: the single-level
RPN with Detectron cell anchors and the +1 box coder, the class-specific box predictor, the vectorised
post-processing (NMS_FILTER 1 and 2), the attribute head, and a strict loader for the official checkpoint.

    model = vinvl_x152c4()
    load_vinvl_weights(model, read_checkpoint("vinvl_vg_x152c4.pth"))
    regions = detect(model, images, load_labelmap("VG-SGG-dicts-vgoi6-clipped.json"))

Module names and official checkpoint keys (VINVL.md 3.3-3.4):

    backbone.body.stem.* / layer{1,2,3}.*             -> backbone.stem.* / backbone.layer{1,2,3}.*
    rpn.head.{conv,cls_logits,bbox_pred}.*            -> rpn.head.*
    roi_heads.box.feature_extractor.head.layer4.*     -> roi_head.layer4.*
    roi_heads.box.predictor.{cls_score,bbox_pred}.*   -> box_predictor.*
    attribute.predictor.*                             -> attribute.*
    attribute.feature_extractor.head.layer4.*         -> (checked equal to the roi_heads copy)
    rpn.anchor_generator.cell_anchors.0               -> (checked equal to our anchors)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import nms, roi_align

from aladin.config import ConfigError, FeaturesConfig
from aladin.features import C4_STRIDE, ImageRegions, RegionFeatureExtractor, feature_dim, init_random, preprocess
from aladin.io import PipelineError, read_json

# dw, dh are clamped from above before exp (maskrcnn-benchmark `BoxCoder`, bbox_xform_clip; VINVL.md 2.3)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


@dataclass(frozen=True)
class DetectorConfig:
    """Everything the detector needs beyond the trunk; defaults are the documented VinVL command (VINVL.md 1.2)."""

    features: FeaturesConfig  # trunk, pooler and pre-processing
    num_classes: int = 1595  # 1594 VG classes + background 0
    attributes: bool = True  # MODEL.ATTRIBUTE_ON
    num_attributes: int = 525  # 524 + "no attribute" 0
    cls_emb_dim: int = 256  # ROI_ATTRIBUTE_HEAD.CLS_EMD_DIM
    attr_emb_dim: int = 512  # ROI_ATTRIBUTE_HEAD.ATTR_EMD_DIM
    attr_threshold: float = 0.05  # POSTPROCESS_ATTRIBUTES_THRESHOLD
    max_attr_per_obj: int = 16
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # h / w
    pre_nms_top_n: int = 6000  # RPN.PRE_NMS_TOP_N_TEST (yaml)
    post_nms_top_n: int = 300  # RPN.POST_NMS_TOP_N_TEST (yaml)
    rpn_nms: float = 0.7
    bbox_reg_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)  # ROI_HEADS.BBOX_REG_WEIGHTS
    ignore_box_regression: bool = True  # TEST.IGNORE_BOX_REGRESSION of the extraction command
    nms_filter: int = 1  # 1: per-class NMS at 0.3 (README command); 2: class-agnostic at `nms`
    filter1_nms: float = 0.3  # hard-coded in SGB's filter 1, not ROI_HEADS.NMS (VINVL.md 8 P9)
    nms: float = 0.5  # ROI_HEADS.NMS, used by filter 2
    score_thresh: float = 0.2
    min_detections: int = 10
    max_detections: int = 100
    legacy_plus_one: bool = True  # w = x2 - x1 + 1 in decode, clip and NMS areas (VINVL.md 4.7)
    class_chunk: int = 128  # classes per IoU block in filter 1 with class-specific boxes (memory bound)

    def __post_init__(self):
        if self.nms_filter not in (1, 2):
            raise ConfigError(f"detector nms_filter must be 1 or 2, got {self.nms_filter!r}")
        if self.nms_filter == 2 and not self.ignore_box_regression:
            # SGB's filter 2 indexes the per-class box list with proposal indices (VINVL.md 4.3 step 5)
            raise ConfigError("detector nms_filter 2 needs ignore_box_regression true: the official path "
                              "returns wrong boxes with class-specific regression")
        if not 0 < self.min_detections <= self.max_detections:
            raise ConfigError(f"detector needs 0 < min_detections <= max_detections, got "
                              f"{self.min_detections} and {self.max_detections}")
        if len(self.bbox_reg_weights) != 4:
            raise ConfigError(f"detector bbox_reg_weights needs 4 values, got {self.bbox_reg_weights!r}")

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.aspect_ratios)


X152C4 = FeaturesConfig(blocks=(3, 8, 36, 3), groups=32, width_per_group=8, stem_channels=64,
                        min_size=600, max_size=1000)  # VINVL.md 1.2 / 2.2


# ---------------------------------------------------------------------------------------------------
# Boxes: Detectron anchors, the +1 box coder, clipping, IoU


def cell_anchors(sizes: Sequence[int], ratios: Sequence[float], stride: int = C4_STRIDE) -> torch.Tensor:
    """(len(ratios) * len(sizes), 4) anchors around cell (0, 0), ratio-major (Detectron `generate_anchors`).

    A (0, 0, stride-1, stride-1) window is reshaped to each ratio keeping its area (rounded half to even,
    as numpy's round), then scaled by size / stride around its centre; sizes count pixels (x2 - x1 + 1).
    """
    base = float(stride)
    centre = 0.5 * (base - 1)  # 7.5 for the 16-px window
    rows = []
    for r in ratios:
        w_r = float(round(math.sqrt(base * base / r)))
        h_r = float(round(w_r * r))
        for s in sizes:
            w, h = w_r * s / base, h_r * s / base
            rows.append([centre - 0.5 * (w - 1), centre - 0.5 * (h - 1),
                         centre + 0.5 * (w - 1), centre + 0.5 * (h - 1)])
    return torch.tensor(rows, dtype=torch.float32)


def grid_anchors(cells: torch.Tensor, height: int, width: int, stride: int = C4_STRIDE) -> torch.Tensor:
    """(H * W * A, 4): cell anchors shifted to every feature cell; anchor (i * W + j) * A + a (VINVL.md 2.3)."""
    ys = torch.arange(0, height * stride, stride, dtype=torch.float32, device=cells.device)  # (H,)
    xs = torch.arange(0, width * stride, stride, dtype=torch.float32, device=cells.device)  # (W,)
    sy, sx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)
    shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)  # (H * W, 1, 4)
    return (shifts + cells.reshape(1, -1, 4)).reshape(-1, 4)


def decode_boxes(deltas: torch.Tensor, boxes: torch.Tensor, weights: Sequence[float],
                 plus_one: bool = True) -> torch.Tensor:
    """Apply (dx, dy, dw, dh) deltas (..., 4k) to boxes (..., 4) -> (..., k, 4) (maskrcnn-benchmark `BoxCoder`).

    plus_one: w = x2 - x1 + 1 and x2' = cx' + w'/2 - 1 (legacy); otherwise torchvision's w = x2 - x1.
    """
    one = 1.0 if plus_one else 0.0
    d = deltas.reshape(*deltas.shape[:-1], -1, 4)  # (..., k, 4)
    w = (boxes[..., 2] - boxes[..., 0] + one).unsqueeze(-1)  # (..., 1)
    h = (boxes[..., 3] - boxes[..., 1] + one).unsqueeze(-1)
    cx = boxes[..., 0].unsqueeze(-1) + 0.5 * w
    cy = boxes[..., 1].unsqueeze(-1) + 0.5 * h
    wx, wy, ww, wh = weights
    dx, dy = d[..., 0] / wx, d[..., 1] / wy  # (..., k)
    dw = (d[..., 2] / ww).clamp(max=BBOX_XFORM_CLIP)
    dh = (d[..., 3] / wh).clamp(max=BBOX_XFORM_CLIP)
    pcx, pcy = dx * w + cx, dy * h + cy
    pw, ph = torch.exp(dw) * w, torch.exp(dh) * h
    return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw - one, pcy + 0.5 * ph - one], dim=-1)


def clip_boxes(boxes: torch.Tensor, height: int, width: int, plus_one: bool = True) -> torch.Tensor:
    """Clamp (..., 4) boxes into the image: [0, W - 1] x [0, H - 1] (legacy) or [0, W] x [0, H]; none removed."""
    one = 1.0 if plus_one else 0.0
    x = boxes[..., 0::2].clamp(min=0, max=width - one)
    y = boxes[..., 1::2].clamp(min=0, max=height - one)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor, plus_one: bool = True) -> torch.Tensor:
    """IoU of (..., N, 4) with (..., M, 4) -> (..., N, M); +1 on sides as the `098df06` NMS kernel.

    Degenerate pairs give 0/0 = nan, which never exceeds a threshold, as in torchvision's kernel.
    """
    one = 1.0 if plus_one else 0.0
    area_a = (a[..., 2] - a[..., 0] + one) * (a[..., 3] - a[..., 1] + one)  # (..., N)
    area_b = (b[..., 2] - b[..., 0] + one) * (b[..., 3] - b[..., 1] + one)  # (..., M)
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])  # (..., N, M, 2)
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt + one).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # (..., N, M)
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter)


def nms_boxes(boxes: torch.Tensor, scores: torch.Tensor, iou: float, plus_one: bool = True) -> torch.Tensor:
    """torchvision NMS; +1-convention IoU equals plain IoU on boxes grown by 1 at x2, y2 (VINVL.md 8 P5)."""
    if plus_one:
        boxes = boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
    return nms(boxes, scores, iou)


# ---------------------------------------------------------------------------------------------------
# RPN (VINVL.md 2.3)


class RPNHead(nn.Module):
    """maskrcnn-benchmark `SingleConvRPNHead`: 3x3 conv + ReLU, then objectness and deltas for A anchors."""

    def __init__(self, channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)
        self.cls_logits = nn.Conv2d(channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, kernel_size=1)

    def forward(self, c4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, C, H, W)
        t = F.relu(self.conv(c4))
        return self.cls_logits(t), self.bbox_pred(t)  # (B, A, H, W), (B, 4A, H, W)


class RPN(nn.Module):
    """Single-level RPN on C4: head, anchors (not a checkpoint tensor here), proposal generation."""

    def __init__(self, channels: int, cfg: DetectorConfig):
        super().__init__()
        self.cfg = cfg
        self.head = RPNHead(channels, cfg.num_anchors)
        # Recomputed, not loaded: the checkpoint copy is only compared against it (VINVL.md 3.4).
        self.register_buffer("cell_anchors", cell_anchors(cfg.anchor_sizes, cfg.aspect_ratios), persistent=False)

    def forward(self, c4: torch.Tensor, image_sizes: Sequence[tuple[int, int]]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """C4 (B, C, H, W) and unpadded resized (h, w) per image -> proposals [(R_i, 4)], objectness [(R_i,)]."""
        logits, deltas = self.head(c4)
        anchors = grid_anchors(self.cell_anchors, c4.shape[2], c4.shape[3])  # (H * W * A, 4) over the padded map
        return generate_proposals(logits, deltas, anchors, image_sizes, self.cfg)


def generate_proposals(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor,
                       image_sizes: Sequence[tuple[int, int]], cfg: DetectorConfig
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """maskrcnn-benchmark `RPNPostProcessor` for one level: sigmoid, top-k, decode, clip, NMS, top-n.

    logits (B, A, H, W), deltas (B, 4A, H, W), anchors (H * W * A, 4). Proposals stay in descending
    objectness order. The min-size filter (RPN.MIN_SIZE 0) keeps everything and is omitted.
    """
    b, a, h, w = logits.shape
    scores = logits.permute(0, 2, 3, 1).reshape(b, -1).sigmoid()  # (B, H * W * A)
    d = deltas.reshape(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)  # (B, H * W * A, 4)
    k = min(cfg.pre_nms_top_n, scores.shape[1])
    top, idx = scores.topk(k, dim=1, sorted=True)  # (B, k)
    boxes_out, scores_out = [], []
    for i, (ih, iw) in enumerate(image_sizes):
        boxes = decode_boxes(d[i, idx[i]], anchors[idx[i]], (1.0, 1.0, 1.0, 1.0), cfg.legacy_plus_one)[:, 0]  # (k, 4)
        boxes = clip_boxes(boxes, ih, iw, cfg.legacy_plus_one)
        keep = nms_boxes(boxes, top[i], cfg.rpn_nms, cfg.legacy_plus_one)[: cfg.post_nms_top_n]
        boxes_out.append(boxes[keep])
        scores_out.append(top[i, keep])
    return boxes_out, scores_out


# ---------------------------------------------------------------------------------------------------
# Box filters (VINVL.md 4.2-4.3)


def _parallel_greedy_nms(over: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Greedy NMS for C score columns at once -> keep (C, R) bool (VINVL.md 4.2, vectorised form).

    over: (R, R) shared or (C, R, R) per class, True where IoU > threshold; scores (C, R). Step k visits
    every class's k-th best box: kept unless already suppressed, then it suppresses its overlaps.
    """
    c, r = scores.shape
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (C, R)
    cls = torch.arange(c, device=scores.device)
    suppressed = torch.zeros(c, r, dtype=torch.bool, device=scores.device)
    keep = torch.zeros(c, r, dtype=torch.bool, device=scores.device)
    for k in range(r):
        best = order[:, k]  # (C,)
        ok = ~suppressed[cls, best]  # (C,)
        keep[cls, best] = ok
        rows = over[best] if over.dim() == 2 else over[cls, best]  # (C, R)
        suppressed |= rows & ok[:, None]
    return keep


def _select(cand: torch.Tensor, score: torch.Tensor, label: torch.Tensor, cfg: DetectorConfig
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort candidates by score; keep clamp(#(score >= thresh), min, max) of them, as many as exist."""
    order = torch.sort(score[cand], descending=True, stable=True).indices
    cand = cand[order]
    n = int((score[cand] >= cfg.score_thresh).sum())
    cand = cand[: min(max(n, cfg.min_detections), cfg.max_detections)]
    return cand, label[cand], score[cand]


def filter_per_class(boxes: torch.Tensor, prob: torch.Tensor, cfg: DetectorConfig
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NMS_FILTER 1 -> (proposal index, label, score) of the kept boxes, by descending score.

    boxes (R, 4) shared by all classes or (R, K, 4) per class; prob (R, K) softmax, column 0 background.
    Every foreground class runs NMS at `filter1_nms` over all R boxes; a box's label is its best class
    among those it survived for, its score that probability; boxes that survived nowhere drop out.
    """
    r, k = prob.shape
    fg = prob[:, 1:]  # (R, K - 1)
    if boxes.dim() == 2:
        over = pairwise_iou(boxes, boxes, cfg.legacy_plus_one) > cfg.filter1_nms  # (R, R)
        keep = _parallel_greedy_nms(over, fg.T).T  # (R, K - 1)
    else:
        keep = torch.zeros(r, k - 1, dtype=torch.bool, device=prob.device)
        for c0 in range(0, k - 1, cfg.class_chunk):
            c1 = min(c0 + cfg.class_chunk, k - 1)
            cb = boxes[:, 1 + c0: 1 + c1].transpose(0, 1)  # (c, R, 4)
            over = pairwise_iou(cb, cb, cfg.legacy_plus_one) > cfg.filter1_nms  # (c, R, R)
            keep[:, c0:c1] = _parallel_greedy_nms(over, fg[:, c0:c1].T).T
    score, label = (fg * keep).max(dim=1)  # (R,)
    cand = torch.nonzero(score > 0).flatten()
    return _select(cand, score, label + 1, cfg)


def filter_class_agnostic(boxes: torch.Tensor, prob: torch.Tensor, cfg: DetectorConfig
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NMS_FILTER 2 -> (proposal index, label, score): best foreground class per box, one NMS at `nms`.

    boxes (R, 4); candidates need non-negative sides and score > score_thresh / 100 (SGB's pre-threshold).
    """
    one = 1.0 if cfg.legacy_plus_one else 0.0
    score, label = prob[:, 1:].max(dim=1)  # (R,)
    valid = (boxes[:, 2] - boxes[:, 0] + one >= 0) & (boxes[:, 3] - boxes[:, 1] + one >= 0)
    cand = torch.nonzero(valid & (score > cfg.score_thresh * 0.01)).flatten()
    cand = cand[nms_boxes(boxes[cand], score[cand], cfg.nms, cfg.legacy_plus_one)]
    return _select(cand, score, label + 1, cfg)


# ---------------------------------------------------------------------------------------------------
# Heads and the detector


class BoxPredictor(nn.Module):
    """maskrcnn-benchmark `FastRCNNPredictor` after the average pool: class logits and per-class deltas."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes)
        self.bbox_pred = nn.Linear(dim, num_classes * 4)


class AttributeHead(nn.Module):
    """SGB attribute predictor: [feature, class embedding] -> fc + ReLU -> attribute logits (VINVL.md 2.6)."""

    def __init__(self, dim: int, cfg: DetectorConfig):
        super().__init__()
        self.cls_embedding = nn.Embedding(cfg.num_classes, cfg.cls_emb_dim)
        self.fc_attr = nn.Linear(dim + cfg.cls_emb_dim, cfg.attr_emb_dim)
        self.attr_score = nn.Linear(cfg.attr_emb_dim, cfg.num_attributes)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # (N, D), (N,)
        x = torch.cat([feats, self.cls_embedding(labels)], dim=1)  # (N, D + E)
        return self.attr_score(F.relu(self.fc_attr(x)))  # (N, num_attributes)


@dataclass
class Detections:
    """One image's output in resized-image pixels, by descending score."""

    boxes: torch.Tensor  # (N, 4)
    labels: torch.Tensor  # (N,) class index, 1..K-1
    scores: torch.Tensor  # (N,)
    features: torch.Tensor  # (N, D) the proposal's pooled res5 feature
    attr_labels: torch.Tensor | None = None  # (N, max_attr_per_obj)
    attr_scores: torch.Tensor | None = None  # (N, max_attr_per_obj), 0 where below the threshold


class VinVLDetector(RegionFeatureExtractor):
    """AttrRCNN at inference: backbone -> RPN -> RoIAlign -> res5 -> box predictor -> filter -> attributes."""

    def __init__(self, config: DetectorConfig):
        super().__init__(config.features)
        self.config = config
        dim = feature_dim(config.features)
        self.rpn = RPN(config.features.stem_channels * 16, config)  # C4: res4 planes 4 x stem, expanded 4x
        self.box_predictor = BoxPredictor(dim, config.num_classes)
        self.attribute = AttributeHead(dim, config) if config.attributes else None

    def pool(self, c4: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-image boxes [(R_i, 4)] in resized pixels -> (sum R_i, D) post-ReLU res5 means."""
        res = self.cfg.pooler_resolution
        pooled = roi_align(c4, list(boxes), output_size=(res, res), spatial_scale=1.0 / C4_STRIDE,
                           sampling_ratio=self.cfg.sampling_ratio, aligned=self.cfg.aligned)  # (K, C, P, P)
        return self.roi_head(pooled).mean(dim=(2, 3))  # (K, D)

    def detect_batch(self, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[Detections]:
        """images (B, 3, H, W) pre-processed and padded; image_sizes the unpadded (h, w) of each."""
        cfg = self.config
        c4 = self.backbone(images)  # (B, C, H/16, W/16)
        proposals, _ = self.rpn(c4, image_sizes)
        feats = self.pool(c4, proposals)  # (K, D)
        prob = F.softmax(self.box_predictor.cls_score(feats), dim=1)  # (K, num_classes)
        if not cfg.ignore_box_regression:
            deltas = self.box_predictor.bbox_pred(feats)  # (K, 4 * num_classes)
        out, start = [], 0
        for (ih, iw), props in zip(image_sizes, proposals):
            rows = slice(start, start + len(props))
            start += len(props)
            if cfg.ignore_box_regression:
                boxes = props  # (R, 4) for every class
            else:
                boxes = decode_boxes(deltas[rows], props[:, None], cfg.bbox_reg_weights,
                                     cfg.legacy_plus_one)[:, :, 0]  # (R, K, 4)
                boxes = clip_boxes(boxes, ih, iw, cfg.legacy_plus_one)
            filt = filter_per_class if cfg.nms_filter == 1 else filter_class_agnostic
            idx, labels, scores = filt(boxes, prob[rows], cfg)
            final = boxes[idx] if boxes.dim() == 2 else boxes[idx, labels]  # (N, 4)
            out.append(Detections(final, labels, scores, feats[rows][idx]))
        if self.attribute is not None:
            self._attributes(c4, out)
        return out

    def _attributes(self, c4: torch.Tensor, dets: list[Detections]) -> None:
        """Attribute head on the final boxes; SGB re-pools them, which without regression repeats `features`."""
        cfg = self.config
        if cfg.ignore_box_regression:
            feats = torch.cat([d.features for d in dets])  # (N, D)
        else:
            feats = self.pool(c4, [d.boxes for d in dets])
        labels = torch.cat([d.labels for d in dets])
        prob = F.softmax(self.attribute(feats, labels), dim=1)  # (N, num_attributes)
        prob[:, 0] = 0.0  # "no attribute"
        prob = torch.where(prob > cfg.attr_threshold, prob, torch.zeros_like(prob))
        k = min(cfg.max_attr_per_obj, prob.shape[1])
        top, idx = prob.topk(k, dim=1, sorted=True)  # (N, k)
        for d, s, i in zip(dets, top.split([len(d.labels) for d in dets]), idx.split([len(d.labels) for d in dets])):
            d.attr_scores, d.attr_labels = s, i


def vinvl_x152c4(attributes: bool = True) -> VinVLDetector:
    """The official X152-C4 detector (VINVL.md 1.2), PyTorch's default init, eval mode.

    ~148 M parameters (593 MB fp32): build under `with torch.device("meta"):` to inspect it for free.
    """
    return VinVLDetector(DetectorConfig(features=X152C4, attributes=attributes)).eval()


def init_detector_random(model: VinVLDetector, seed: int) -> VinVLDetector:
    """Seeded random weights: the trunk as `features.init_random`, heads as maskrcnn-benchmark's training init
    (RPN and cls_score normal std 0.01, bbox_pred 0.001, biases 0)."""
    init_random(model, seed)
    g = torch.Generator().manual_seed(seed + 1)  # a stream apart from the trunk's
    layers = [(model.rpn.head.conv, 0.01), (model.rpn.head.cls_logits, 0.01), (model.rpn.head.bbox_pred, 0.01),
              (model.box_predictor.cls_score, 0.01), (model.box_predictor.bbox_pred, 0.001)]
    if model.attribute is not None:
        layers += [(model.attribute.fc_attr, 0.01), (model.attribute.attr_score, 0.01)]
    with torch.no_grad():
        for layer, std in layers:
            layer.weight.normal_(0.0, std, generator=g)
            layer.bias.zero_()
        if model.attribute is not None:
            model.attribute.cls_embedding.weight.normal_(0.0, 1.0, generator=g)
    return model


def build_detector(config: DetectorConfig, seed: int) -> VinVLDetector:
    """A detector with seeded random weights, eval mode (tests and the embedded profile)."""
    return init_detector_random(VinVLDetector(config), seed).eval()


# ---------------------------------------------------------------------------------------------------
# Checkpoint (VINVL.md 3)

# Official prefix (after `module.`) -> ours; suffixes are identical (torchvision Bottleneck names).
KEY_MAP = (
    ("backbone.body.stem.", "backbone.stem."),
    ("backbone.body.layer1.", "backbone.layer1."),
    ("backbone.body.layer2.", "backbone.layer2."),
    ("backbone.body.layer3.", "backbone.layer3."),
    ("rpn.head.", "rpn.head."),
    ("roi_heads.box.feature_extractor.head.layer4.", "roi_head.layer4."),
    ("roi_heads.box.predictor.", "box_predictor."),
    ("attribute.predictor.", "attribute."),
)
SHARED_RES5 = ("attribute.feature_extractor.head.layer4.", "roi_heads.box.feature_extractor.head.layer4.")
ANCHORS_KEY = "rpn.anchor_generator.cell_anchors.0"


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The official `.pth` as a flat {name: tensor}; a {"model": state_dict} wrapper is unwrapped (VINVL.md 3.2)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a corrupt or non-weights file
        raise PipelineError(f"{path}: not a loadable PyTorch weights file ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise PipelineError(f"{path}: expected a state dict (or {{'model': state dict}}), got {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise PipelineError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return obj


def _official_to_ours(key: str) -> str | None:
    for official, ours in KEY_MAP:
        if key.startswith(official):
            return ours + key[len(official):]
    return None


def load_vinvl_weights(model: VinVLDetector, state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Load official weights strictly; returns {official key: our key} of what was loaded.

    A `module.` prefix is stripped when every key has it (as the official loader does). The duplicate res5
    under `attribute.feature_extractor` and the cell anchors are checked, not loaded (values are compared
    unless the tensors are on the meta device). A model without the attribute head ignores
    `attribute.predictor.*`. Anything unknown, missing or mis-shaped raises `PipelineError` naming it.
    """
    keys = list(state_dict)
    prefix = "module." if keys and all(k.startswith("module.") for k in keys) else ""
    sd = {k[len(prefix):]: v for k, v in state_dict.items()}
    ours = model.state_dict()
    mapping: dict[str, str] = {}
    for key, value in sd.items():
        name = prefix + key
        if key.startswith(SHARED_RES5[0]):
            _check_copy(name, value, SHARED_RES5[1] + key[len(SHARED_RES5[0]):], sd, prefix)
            continue
        if key == ANCHORS_KEY:
            _check_anchors(name, value, model)
            continue
        if model.attribute is None and key.startswith("attribute.predictor."):
            continue
        target = _official_to_ours(key)
        if target is None or target not in ours:
            raise PipelineError(f"checkpoint key {name!r} is unexpected: the model has no "
                                f"{target or 'matching parameter'!r}")
        if tuple(value.shape) != tuple(ours[target].shape):
            raise PipelineError(f"checkpoint key {name!r} has shape {list(value.shape)}, the model's "
                                f"{target!r} has {list(ours[target].shape)}")
        mapping[key] = target
    loaded = set(mapping.values())
    missing = [k for k in ours if k not in loaded]
    if missing:
        official = {ours_k: off for off, ours_k in _inverse_names(ours)}
        raise PipelineError(f"checkpoint misses {prefix + official.get(missing[0], missing[0])!r} (model "
                            f"{missing[0]!r}; {len(missing)} model tensors missing in all)")
    model.load_state_dict({mapping_target: sd[key] for key, mapping_target in mapping.items()}, strict=True)
    return mapping


def _inverse_names(ours: dict) -> list[tuple[str, str]]:
    """(official name, our name) for every model tensor, for messages."""
    pairs = []
    for k in ours:
        for official, mine in KEY_MAP:
            if k.startswith(mine):
                pairs.append((official + k[len(mine):], k))
                break
    return pairs


def _check_copy(name: str, value: torch.Tensor, partner: str, sd: dict, prefix: str) -> None:
    if partner not in sd:
        raise PipelineError(f"checkpoint key {name!r} is unexpected: it duplicates {prefix + partner!r}, "
                            f"which is absent")
    other = sd[partner]
    if value.shape != other.shape or (not value.is_meta and not other.is_meta and not torch.equal(value, other)):
        raise PipelineError(f"checkpoint key {name!r} differs from {prefix + partner!r}; the attribute head "
                            f"shares the box head's res5, so they must be equal")


def _check_anchors(name: str, value: torch.Tensor, model: VinVLDetector) -> None:
    cfg = model.config
    expected = cell_anchors(cfg.anchor_sizes, cfg.aspect_ratios)
    if value.shape != expected.shape or (not value.is_meta and not torch.equal(value.float().cpu(), expected)):
        raise PipelineError(f"checkpoint key {name!r} does not equal the Detectron cell anchors for sizes "
                            f"{cfg.anchor_sizes} and ratios {cfg.aspect_ratios} (VINVL.md 2.3)")


# ---------------------------------------------------------------------------------------------------
# Label map (VINVL.md 3.5) and the image-level entry point


@dataclass(frozen=True)
class Labelmap:
    """Names by index: classes[0] = "__background__", attributes[0] = "__no_attribute__" (added, as SGB does)."""

    classes: tuple[str, ...]
    attributes: tuple[str, ...] = ()


def _names(path: Path, raw: dict, key: str, zero: str) -> tuple[str, ...]:
    table = raw.get(key)
    if not isinstance(table, dict) or not table:
        raise PipelineError(f"{path}: key {key!r} must be a non-empty object {{name: index}}")
    names = [None] * (len(table) + 1)
    for name, idx in table.items():
        if isinstance(idx, bool) or not isinstance(idx, int) or not 1 <= idx <= len(table) or names[idx] is not None:
            raise PipelineError(f"{path}: {key}[{name!r}] = {idx!r}; indices must be distinct integers "
                                f"1..{len(table)}")
        names[idx] = name
    names[0] = zero
    return tuple(names)


def load_labelmap(path: str | Path) -> Labelmap:
    """VG label map JSON: `label_to_idx` (required) and `attribute_to_idx` (if present), both 1-based."""
    path = Path(path)
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a JSON object with 'label_to_idx', got {type(raw).__name__}")
    classes = _names(path, raw, "label_to_idx", "__background__")
    attributes = _names(path, raw, "attribute_to_idx", "__no_attribute__") if "attribute_to_idx" in raw else ()
    return Labelmap(classes, attributes)


@dataclass
class DetectedRegions(ImageRegions):
    """`ImageRegions` plus attributes: per region the names with a non-zero score, best first."""

    attributes: list[list[str]] = field(default_factory=list)
    attr_scores: list[list[float]] = field(default_factory=list)

    def sorted_by_conf(self) -> "DetectedRegions":
        order = sorted(range(len(self.confs)), key=lambda i: -self.confs[i])
        base = ImageRegions.sorted_by_conf(self)
        pick = (lambda xs: [xs[i] for i in order]) if self.attributes else (lambda xs: xs)
        return DetectedRegions(**{f.name: getattr(base, f.name) for f in dataclasses.fields(ImageRegions)},
                               attributes=pick(self.attributes), attr_scores=pick(self.attr_scores))


def detect(model: VinVLDetector, images: Sequence[Image.Image], labelmap: Labelmap,
           image_ids: Sequence[int] | None = None) -> list[DetectedRegions]:
    """Detect regions in PIL images -> one `DetectedRegions` each, boxes in original pixels (VINVL.md 4.6).

    Images run one at a time: padding to a batch changes features near the border (VINVL.md 8 P10).
    `image_ids` default to 0..n-1.
    """
    cfg = model.config
    if len(labelmap.classes) != cfg.num_classes:
        raise PipelineError(f"label map has {len(labelmap.classes)} classes with background, the detector "
                            f"{cfg.num_classes}")
    if model.attribute is not None and len(labelmap.attributes) != cfg.num_attributes:
        raise PipelineError(f"label map has {len(labelmap.attributes)} attributes with 'no attribute', the "
                            f"detector {cfg.num_attributes}")
    ids = list(range(len(images))) if image_ids is None else list(image_ids)
    if len(ids) != len(images):
        raise PipelineError(f"{len(images)} images but {len(ids)} image ids")
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for image_id, image in zip(ids, images):
            t = preprocess(image, cfg.features)  # (3, h, w)
            h, w = t.shape[1:]
            det = model.detect_batch(t[None].to(device), [(h, w)])[0]
            # BoxList.resize: x by orig_w / new_w, y by orig_h / new_h, separately, no +1
            ratio = torch.tensor([image.width / w, image.height / h] * 2, dtype=torch.float32)
            boxes = det.boxes.float().cpu() * ratio  # (N, 4)
            regions = DetectedRegions(int(image_id), image.width, image.height,
                                      [tuple(float(v) for v in b) for b in boxes.tolist()],
                                      [labelmap.classes[i] for i in det.labels.tolist()],
                                      [float(s) for s in det.scores.tolist()],
                                      det.features.float().cpu().numpy().astype(np.float32))
            if det.attr_labels is not None:
                for labels, scores in zip(det.attr_labels.tolist(), det.attr_scores.tolist()):
                    regions.attributes.append([labelmap.attributes[i] for i, s in zip(labels, scores) if s > 0])
                    regions.attr_scores.append([float(s) for s in scores if s > 0])
            out.append(regions)
    return out


# ---------------------------------------------------------------------------------------------------
# From params (features.mode: detect)


def config_from_params(features: FeaturesConfig) -> DetectorConfig:
    """The detector described by the `features` params section: its trunk and `features.detector`."""
    p = features.detector
    return DetectorConfig(features=features, num_classes=p.num_classes, attributes=p.attributes,
                          num_attributes=p.num_attributes, nms_filter=p.nms_filter, score_thresh=p.score_thresh,
                          min_detections=p.min_detections, max_detections=p.max_detections,
                          legacy_plus_one=p.legacy_plus_one)


def numbered_labelmap(config: DetectorConfig) -> Labelmap:
    """Names for a detector without a label map file (random weights): class_1 ..., attribute_1 ..."""
    return Labelmap(("__background__",) + tuple(f"class_{i}" for i in range(1, config.num_classes)),
                    ("__no_attribute__",) + tuple(f"attribute_{i}" for i in range(1, config.num_attributes))
                    if config.attributes else ())


def detector_from_params(features: FeaturesConfig, seed: int) -> tuple[VinVLDetector, Labelmap]:
    """Build the detector of `features.detector`: official weights when a checkpoint is named, else seeded
    random weights; the label map file when named, else numbered names."""
    config = config_from_params(features)
    p = features.detector
    if p.checkpoint:
        model = VinVLDetector(config).eval()
        load_vinvl_weights(model, read_checkpoint(p.checkpoint))
    else:
        model = build_detector(config, seed)
    labelmap = load_labelmap(p.labelmap) if p.labelmap else numbered_labelmap(config)
    return model, labelmap
