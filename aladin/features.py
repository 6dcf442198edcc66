"""Region features: a C4 ResNe(X)t trunk, RoIAlign, a res5 head and an average pool (VINVL.md 2).

One extractor of which VinVL X152-C4 is a configuration (blocks [3, 8, 36, 3], groups 32, width_per_group 8,
stem 64, D = 2048). Module names follow maskrcnn-benchmark so official checkpoint keys map one to one:

    backbone.body.stem.*                           -> backbone.stem.*
    backbone.body.layer{1,2,3}.*                   -> backbone.layer{1,2,3}.*
    roi_heads.box.feature_extractor.head.layer4.*  -> roi_head.layer4.*

Regions come from given boxes today (`features.mode: given_boxes`); the detector (RPN + box filter,
VINVL.md 2.3 and 4) is a second entry of `REGION_SOURCES`. Files written here are the released
VinVL layout (VINVL.md 6.3-6.5): `features.tsv`, `predictions.tsv`, their `.lineidx`, `imageid2idx.json`.
"""
from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import roi_align

from aladin import data
from aladin.config import FeaturesConfig, Params
from aladin.io import PipelineError, atomic_path, write_json
from aladin.tsv import TSVWriter

C4_STRIDE = 16  # stem 4 x res3 2 x res4 2 (VINVL.md 2.2); RoIAlign spatial_scale = 1/16
BOX_DIMS = 6  # x1/W, y1/H, x2/W, y2/H, w/W, h/H appended to each feature (VINVL.md 5)
SPLITS = ("train", "val", "test")


def feature_dim(cfg: FeaturesConfig) -> int:
    """D: res5 has 8x the stem's planes, and a bottleneck expands its planes 4x (VinVL: 64 * 8 * 4 = 2048)."""
    return cfg.stem_channels * 8 * Bottleneck.expansion


def region_dim(cfg: FeaturesConfig) -> int:
    """Values per region row of features.tsv: D + 6 (VinVL: 2054)."""
    return feature_dim(cfg) + BOX_DIMS


# ---------------------------------------------------------------------------------------------------
# Network


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and NO epsilon (maskrcnn-benchmark `layers/batch_norm.py`; VINVL.md 2.2).

    torchvision's FrozenBatchNorm2d adds eps=1e-5 by default, which changes the official features (VINVL.md P4).
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        scale = self.weight * self.running_var.rsqrt()  # (C,)
        shift = self.bias - self.running_mean * scale  # (C,)
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class Stem(nn.Module):
    """conv 7x7/2 -> FrozenBN -> ReLU -> max-pool 3x3/2 (maskrcnn-benchmark `StemWithFixedBatchNorm`)."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, out_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C, H/4, W/4)
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def make_stage(inplanes: int, planes: int, blocks: int, stride: int, cfg: FeaturesConfig) -> nn.Sequential:
    """`blocks` torchvision Bottlenecks (stride in the 3x3 = STRIDE_IN_1X1 False); block 0 projects."""
    out = planes * Bottleneck.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, kernel_size=1, stride=stride, bias=False),
                                   FrozenBatchNorm2d(out))
    layers = [Bottleneck(inplanes, planes, stride, downsample, cfg.groups, cfg.width_per_group,
                         norm_layer=FrozenBatchNorm2d)]
    layers += [Bottleneck(out, planes, groups=cfg.groups, base_width=cfg.width_per_group,
                          norm_layer=FrozenBatchNorm2d) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class Backbone(nn.Module):
    """stem -> res2 -> res3 -> res4; returns C4 (stride 16)."""

    def __init__(self, cfg: FeaturesConfig):
        super().__init__()
        base = cfg.stem_channels
        self.stem = Stem(base)
        self.layer1 = make_stage(base, base, cfg.blocks[0], 1, cfg)
        self.layer2 = make_stage(base * 4, base * 2, cfg.blocks[1], 2, cfg)
        self.layer3 = make_stage(base * 8, base * 4, cfg.blocks[2], 2, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 16 * base, H/16, W/16)
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


class RoIHead(nn.Module):
    """res5 applied per RoI, stride 2 in its first 3x3 (maskrcnn-benchmark `ResNet50Conv5ROIFeatureExtractor`)."""

    def __init__(self, cfg: FeaturesConfig):
        super().__init__()
        base = cfg.stem_channels
        self.layer4 = make_stage(base * 16, base * 8, cfg.blocks[3], 2, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (K, 16 * base, P, P) -> (K, D, P/2, P/2)
        return self.layer4(x)


class RegionFeatureExtractor(nn.Module):
    """Images plus boxes in resized-image pixels -> one D-d post-ReLU mean per box (VINVL.md 2.4-2.5)."""

    def __init__(self, cfg: FeaturesConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.roi_head = RoIHead(cfg)

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) pre-processed and padded; rois (K, 5) = (batch index, x1, y1, x2, y2)."""
        c4 = self.backbone(images)  # (B, C4, H/16, W/16)
        res = self.cfg.pooler_resolution
        pooled = roi_align(c4, rois, output_size=(res, res), spatial_scale=1.0 / C4_STRIDE,
                           sampling_ratio=self.cfg.sampling_ratio, aligned=self.cfg.aligned)  # (K, C4, P, P)
        return self.roi_head(pooled).mean(dim=(2, 3))  # (K, D)


# RMS of a mean-subtracted pixel on the 0-255 scale, roughly: detectron2's ImageNet PIXEL_STD is
# [57.375, 57.120, 58.395]. The stem's random BN divides by it so activations start O(1).
PIXEL_SCALE = 58.0


def init_random(model: RegionFeatureExtractor, seed: int) -> RegionFeatureExtractor:
    """Seeded random weights for the embedded profile (no checkpoint): informative, O(1) activations.

    Convs are kaiming-normal (fan_out, relu) as in torchvision's ResNet. A plain net at that init has no
    data-free scale control, so each frozen BN gets the statistics a unit-variance BN would have: it
    multiplies by sqrt(fan_out / fan_in) (fan_in counts the grouped conv's real inputs), which makes every
    conv + BN preserve the second moment through a ReLU. The last BN of each residual branch is scaled by
    1 / sqrt(2 * blocks) so the residual sum grows at most by about e over the whole depth.
    """
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum(model.cfg.blocks)
    pairs = [(model.backbone.stem.conv1, model.backbone.stem.bn1, PIXEL_SCALE, 1.0)]
    for stage in (model.backbone.layer1, model.backbone.layer2, model.backbone.layer3, model.roi_head.layer4):
        for block in stage:
            pairs += [(block.conv1, block.bn1, 1.0, 1.0), (block.conv2, block.bn2, 1.0, 1.0),
                      (block.conv3, block.bn3, 1.0, 1.0 / math.sqrt(2 * n_blocks))]
            if block.downsample is not None:
                pairs.append((block.downsample[0], block.downsample[1], 1.0, 1.0))
    with torch.no_grad():
        for conv, bn, input_scale, gain in pairs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu", generator=g)
            k = conv.kernel_size[0] * conv.kernel_size[1]
            fan_in = conv.in_channels // conv.groups * k
            fan_out = conv.out_channels * k  # torch's definition, which kaiming_normal_ used
            bn.weight.fill_(gain)
            bn.bias.zero_()
            bn.running_mean.zero_()
            bn.running_var.fill_(fan_in / fan_out * input_scale ** 2)
    return model


def build_extractor(cfg: FeaturesConfig, seed: int) -> RegionFeatureExtractor:
    """The extractor in eval mode with seeded random weights (the embedded profile)."""
    return init_random(RegionFeatureExtractor(cfg), seed).eval()


# ---------------------------------------------------------------------------------------------------
# Pre-processing (VINVL.md 2.1)


def resized_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(new_width, new_height) by maskrcnn-benchmark `transforms.Resize.get_size`.

    The float expressions keep the original left-to-right order: int(s * long / short) truncates
    differently from int(s * (long / short)) (113x100 -> 678x600, not 677).
    """
    short, long = float(min(width, height)), float(max(width, height))
    size = min_size
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return width, height
    if width < height:
        return size, int(size * height / width)
    return int(size * width / height), size


def preprocess(image: Image.Image, cfg: FeaturesConfig) -> torch.Tensor:
    """RGB PIL image -> (3, h, w) float32, BGR 0-255 minus `pixel_means`, resized by the rule above.

    PIL bilinear on uint8, antialiased when shrinking (what torchvision's resize does to a PIL image).
    The official ToTensor /255 then x255 round trip is exact in float32 for all 256 values, so it is skipped.
    """
    image = image.convert("RGB")
    size = resized_size(image.width, image.height, cfg.min_size, cfg.max_size)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    rgb = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (h, w, 3)
    bgr = rgb.permute(2, 0, 1).flip(0).float()  # (3, h, w)
    return bgr - torch.tensor(cfg.pixel_means, dtype=torch.float32).reshape(3, 1, 1)


def pad_batch(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Zero-pad at bottom/right to the largest h and w, no size divisibility (VINVL.md 2.1 step 6)."""
    h = max(t.shape[1] for t in tensors)
    w = max(t.shape[2] for t in tensors)
    batch = torch.zeros(len(tensors), 3, h, w)  # (B, 3, H, W)
    for b, t in enumerate(tensors):
        batch[b, :, : t.shape[1], : t.shape[2]] = t
    return batch


# ---------------------------------------------------------------------------------------------------
# Regions


@dataclass
class ImageRegions:
    """The regions of one image, in output order; boxes are original-image pixels (x1, y1, x2, y2)."""

    image_id: int
    width: int
    height: int
    boxes: list[tuple[float, float, float, float]]
    classes: list[str]
    confs: list[float]
    features: np.ndarray  # (N, D) float32

    def sorted_by_conf(self) -> "ImageRegions":
        """Descending confidence; ties keep their order (Python's sort is stable)."""
        order = sorted(range(len(self.confs)), key=lambda i: -self.confs[i])
        return ImageRegions(self.image_id, self.width, self.height, [self.boxes[i] for i in order],
                            [self.classes[i] for i in order], [self.confs[i] for i in order],
                            self.features[order])


def box_vectors(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 4) x1 y1 x2 y2 original pixels -> (N, 6) [x1/W, y1/H, x2/W, y2/H, (x2-x1)/W, (y2-y1)/H] (VINVL.md 5).

    No +1 on widths and no clipping, as in the Oscar#33 recipe and MMF `_norm_box`.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float64)
    corners = b / scale  # (N, 4)
    sizes = (b[:, 2:] - b[:, :2]) / scale[:2]  # (N, 2)
    return np.concatenate([corners, sizes], axis=1).astype(np.float32)


def region_vectors(regions: ImageRegions) -> np.ndarray:
    """(N, D + 6) float32: the feature, then the 6-d box vector."""
    boxes = box_vectors(np.asarray(regions.boxes), regions.width, regions.height)
    return np.concatenate([regions.features.astype(np.float32), boxes], axis=1)


def features_for_boxes(model: RegionFeatureExtractor, images: Sequence[Image.Image],
                       boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Features of given boxes: images[i] with boxes[i] (N_i, 4) in its pixels -> list of (N_i, D) float32.

    One padded batch through the backbone, all boxes through the RoI head together.
    """
    cfg = model.cfg
    tensors, rois = [], []
    for b, (image, bx) in enumerate(zip(images, boxes)):
        t = preprocess(image, cfg)  # (3, h, w)
        tensors.append(t)
        # BoxList.resize: x by new_w / old_w, y by new_h / old_h, in float32.
        ratio = torch.tensor([t.shape[2] / image.width, t.shape[1] / image.height] * 2, dtype=torch.float32)
        scaled = torch.as_tensor(np.asarray(bx, dtype=np.float32)).reshape(-1, 4) * ratio  # (N_i, 4)
        rois.append(torch.cat([torch.full((len(scaled), 1), float(b)), scaled], dim=1))  # (N_i, 5)
    device = next(model.parameters()).device
    with torch.inference_mode():
        feats = model(pad_batch(tensors).to(device), torch.cat(rois).to(device))  # (K, D)
        feats = feats.float().cpu()  # no-ops for fp32 on the CPU; autocast and cuda need them
    counts = [len(r) for r in rois]
    return [f.numpy().copy() for f in torch.split(feats, counts)]


def given_box_regions(model: RegionFeatureExtractor, records: Sequence, images: Sequence[Image.Image],
                      instances: dict) -> list[ImageRegions]:
    """`features.mode: given_boxes`: annotation boxes, conf 1.0, class = the category name."""
    boxes = [np.array([[b.x1, b.y1, b.x2, b.y2] for b in instances[r.image_id]], dtype=np.float64)
             for r in records]
    feats = features_for_boxes(model, images, boxes)
    out = []
    for r, image, bx, f in zip(records, images, boxes, feats):
        names = [b.category for b in instances[r.image_id]]
        out.append(ImageRegions(r.image_id, image.width, image.height, [tuple(map(float, x)) for x in bx],
                                names, [1.0] * len(names), f))
    return out


def detected_regions(model: RegionFeatureExtractor, records: Sequence, images: Sequence[Image.Image],
                     instances: dict) -> list[ImageRegions]:
    """`features.mode: detect`: the VinVL detector's own boxes, classes, confidences and attributes."""
    from .detector import detect  # imported here: the detector is built on this module

    return detect(model, images, model.labelmap, [r.image_id for r in records])


REGION_SOURCES: dict[str, Callable[..., list[ImageRegions]]] = {"given_boxes": given_box_regions,
                                                                "detect": detected_regions}


def build_region_model(cfg: FeaturesConfig, seed: int) -> RegionFeatureExtractor:
    """The model `cfg.mode` needs: the given-box extractor, or the detector with its label map attached."""
    if cfg.mode == "detect":
        from .detector import detector_from_params  # imported here: the detector is built on this module

        model, labelmap = detector_from_params(cfg, seed)
        model.labelmap = labelmap
        return model
    return build_extractor(cfg, seed)


# ---------------------------------------------------------------------------------------------------
# Files (VINVL.md 6.3-6.5)


def region_rows(it: ImageRegions) -> tuple[list[str], list[str]]:
    """The features.tsv and predictions.tsv columns of one image (VINVL.md 6.3, 6.5).

    The one place the row format lives: `write_region_files` and the sharded writer of
    `aladin.extraction` both use it, so their files agree byte for byte.
    """
    key = str(it.image_id)
    vectors = region_vectors(it)  # (N, D + 6)
    payload = base64.b64encode(vectors.astype("<f4").tobytes()).decode("ascii")
    objects = [{"rect": list(map(float, box)), "class": name, "conf": float(conf)}
               for box, name, conf in zip(it.boxes, it.classes, it.confs)]
    for obj, names, scores in zip(objects, getattr(it, "attributes", []), getattr(it, "attr_scores", [])):
        obj["attributes"], obj["attr_scores"] = names, scores  # detection mode (VINVL.md 6.2)
    return ([key, str(len(vectors)), payload],
            [key, json.dumps({"image_h": it.height, "image_w": it.width, "objects": objects})])


def write_region_files(out_dir: str | Path, items: Iterable[ImageRegions]) -> int:
    """Write features.tsv, predictions.tsv (+ .lineidx) and imageid2idx.json into `out_dir`; returns rows."""
    out_dir = Path(out_dir)
    index: dict[str, int] = {}
    with TSVWriter(out_dir / "features.tsv") as feats, TSVWriter(out_dir / "predictions.tsv") as preds:
        for it in items:
            key = str(it.image_id)
            if key in index:
                raise PipelineError(f"image id {key} appears twice (rows {index[key] + 1} and {feats.rows + 1})")
            feature_row, prediction_row = region_rows(it)
            feats.write(feature_row)
            preds.write(prediction_row)
            index[key] = feats.rows - 1
    write_json(out_dir / "imageid2idx.json", index)
    return len(index)


def dataset_records(dataset_dir: str | Path, cfg: FeaturesConfig) -> tuple[list, dict]:
    """(records of train, val, test in order, boxes by image id), every image checked up front.

    Fails before any work, not after an hour of it: unknown mode, an id listed twice, an image without
    boxes, a box of negative size.
    """
    if cfg.mode not in REGION_SOURCES:
        raise PipelineError(f"features.mode {cfg.mode!r} is not implemented (have {sorted(REGION_SOURCES)})")
    records = [r for split in SPLITS for r in data.load_karpathy(dataset_dir, split)]
    instances = data.load_instances(dataset_dir)
    where = Path(dataset_dir) / data.INSTANCES_FILE
    seen: set[int] = set()
    for r in records:
        if r.image_id in seen:
            raise PipelineError(f"{Path(dataset_dir) / data.KARPATHY_FILE}: image id {r.image_id} is listed twice")
        seen.add(r.image_id)
        if cfg.mode == "detect":
            continue  # the detector finds its own boxes
        if not instances.get(r.image_id):
            raise PipelineError(f"{where}: image id {r.image_id} ({r.file_name}) has no boxes; "
                                f"features.mode {cfg.mode} needs at least one")
        for b in instances[r.image_id]:
            if not (b.x2 >= b.x1 and b.y2 >= b.y1):
                raise PipelineError(f"{where}: image id {r.image_id} has a box with negative size "
                                    f"{(b.x1, b.y1, b.x2, b.y2)}")
    return records, instances


def extract_dataset(dataset_dir: str | Path, out_dir: str | Path, params: Params,
                    on_batch: Callable[[int, int], None] | None = None) -> int:
    """Regions of every image of the train, val and test splits into one file set at `out_dir`.

    The plain single-process loop: images decoded in this process, consecutive batches of
    `features.batch_size`, any unreadable image stops it. `aladin.extraction` is the driver for scale
    (decoding workers, shards across ranks, resume, error records) and writes the same bytes.
    `on_batch(done, total)` reports progress. Returns the number of images. The output directory
    appears whole or not at all.
    """
    cfg = params.features
    records, instances = dataset_records(dataset_dir, cfg)
    regions_of = REGION_SOURCES[cfg.mode]
    model = build_region_model(cfg, params.seed)

    def items() -> Iterator[ImageRegions]:
        for start in range(0, len(records), cfg.batch_size):
            batch = records[start: start + cfg.batch_size]
            images = [data.load_image(dataset_dir, r) for r in batch]
            for regions in regions_of(model, batch, images, instances):
                yield regions.sorted_by_conf() if cfg.sort_by_conf else regions
            if on_batch is not None:
                on_batch(start + len(batch), len(records))

    with atomic_path(out_dir, directory=True) as tmp:
        return write_region_files(tmp, items())
