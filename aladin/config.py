"""Typed params: `params.yaml` read into frozen dataclasses.

Every section of `params.yaml` is one dataclass below. The loader rejects unknown keys with their full
dotted name, coerces ints and numeric strings into float fields (`dvc exp run -S distill.temperature=4`
writes an int, PyYAML reads `1e-05` as a string; DVC_AND_NOTEBOOKS.md section 3.2), and raises one
`ConfigError` per bad value, naming the file and the key.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file and the key."""


# ---------------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # paper profile: coco (a later issue)
    n_train: int = 3000
    n_val: int = 250
    n_test: int = 500
    captions_per_image: int = 5
    image_size: int = 128  # square synthetic canvas, pixels
    min_objects: int = 2
    max_objects: int = 4
    background_noise: float = 12.0  # std of the per-pixel Gaussian noise, 0-255 scale


@dataclass(frozen=True)
class BackboneConfig:
    """Shape of the initial BERT backbone written by the data stage (VinVL-base is 768/12/12/3072)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 64
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    use_img_layernorm: bool = True  # inferred 1 for the VinVL coco_ir checkpoint (ALADIN.md 1.3)
    img_layer_norm_eps: float = 1e-12


@dataclass(frozen=True)
class DetectorParams:
    """Detection mode (`features.mode: detect`): VinVL's box head and post-processing (VINVL.md 1.2, 4)."""

    checkpoint: str = ""  # vinvl_vg_x152c4.pth; empty: seeded random weights (tests, benchmarks)
    labelmap: str = ""  # VG-SGG-dicts-vgoi6-clipped.json; empty: classes named class_1, class_2, ...
    num_classes: int = 1595  # with background
    num_attributes: int = 525  # with "no attribute"
    attributes: bool = True
    nms_filter: int = 1  # 1: per-class NMS 0.3 over all proposals (documented); 2: class-agnostic
    score_thresh: float = 0.2
    min_detections: int = 10
    max_detections: int = 100
    legacy_plus_one: bool = True  # x2 - x1 + 1 widths, as the released extractor


@dataclass(frozen=True)
class FeaturesConfig:
    """The region-feature extractor: a C4 ResNe(X)t trunk, RoIAlign, res5 head, average pool.

    VinVL X152-C4 is blocks [3, 8, 36, 3], groups 32, width_per_group 8, stem 64 (VINVL.md 2.2);
    the embedded default is a tiny configuration of the same code with seeded random weights.
    """

    mode: str = "given_boxes"  # given_boxes: boxes from the instance annotations; detect: next issue
    blocks: tuple[int, ...] = (1, 1, 1, 1)  # bottlenecks in res2, res3, res4 (= C4), res5 (head)
    groups: int = 1
    width_per_group: int = 64  # inner width = planes * width_per_group / 64 * groups
    stem_channels: int = 8  # stem output = base planes; region feature dim D = 32 * stem_channels
    min_size: int = 128  # shorter side after resizing (VinVL: 600)
    max_size: int = 224  # longer side cap (VinVL: 1000)
    pixel_means: tuple[float, ...] = (103.530, 116.280, 123.675)  # BGR, 0-255 (VINVL.md 2.1)
    pooler_resolution: int = 14
    sampling_ratio: int = 0
    aligned: bool = False
    sort_by_conf: bool = True  # write regions in descending confidence (ALADIN.md 6.5)
    batch_size: int = 32
    detector: DetectorParams = field(default_factory=DetectorParams)  # read only in detect mode


@dataclass(frozen=True)
class ModelConfig:
    max_seq_length: int = 32  # text branch and tag text width (paper: 50)
    max_img_seq_length: int = 8  # regions kept per image (paper: 34)
    img_feature_dim: int = 262  # D + 6 of features.tsv (paper: 2054); checked against the files
    alignment_mode: str = "MrSw"
    matching_layers: int = 2  # "tern-layers"
    matching_heads: int = 4
    matching_ff: int = 64  # dim_feedforward of the matching head's layers (paper: 768 = embed size)
    matching_dropout: float = 0.1


@dataclass(frozen=True)
class CompatConfig:
    """Quirks of the original code (ALADIN.md section 9); true/`unk` reproduces the original."""

    image_first_token: str = "unk"  # Q1: image branch starts with [UNK], not [CLS]
    first_region_as_cls: bool = True  # Q5
    drop_last_wordpiece: bool = True  # Q6
    alignment_zero_fill: bool = True  # Q7
    val_rsum_sum_heads: bool = True  # Q8
    frozen_backbone_dropout: bool = True  # Q9


@dataclass(frozen=True)
class TrainAlignmentConfig:
    epochs: int = 4
    batch_size: int = 32
    lr: float = 5.0e-4  # paper: 1e-5 from the retrieval-tuned VinVL; here a random tiny BERT
    lr_step: int = 3  # StepLR step in epochs (paper: 15)
    lr_gamma: float = 0.1
    grad_clip: float = 2.0
    margin: float = 0.2
    max_violation: bool = True


@dataclass(frozen=True)
class DistillConfig:
    mode: str = "listnet"  # listnet (paper) | triplet (hinge on the matching scores)
    temperature: float = 6.0  # multiplies student scores only (mesnico/ALADIN alad/loss.py)
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1.0e-3
    lr_step: int = 2  # paper: 10 for the head-only recipes
    lr_gamma: float = 0.1
    grad_clip: float = 2.0
    margin: float = 0.2  # only for mode: triplet
    max_violation: bool = True


@dataclass(frozen=True)
class EvalConfig:
    fold_size: int = 100  # images per fold of the "1K" analogue (COCO: 1000)
    batch_size: int = 64
    chunk_size: int = 32  # gallery items per alignment-scoring chunk
    latency_queries: int = 50  # caption queries timed per head
    qualitative_queries: int = 6


@dataclass(frozen=True)
class ReportConfig:
    qualitative_top_k: int = 5


@dataclass(frozen=True)
class Params:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)
    train_alignment: TrainAlignmentConfig = field(default_factory=TrainAlignmentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


# Values a field may take, checked at load time so a typo fails before any work starts.
CHOICES = {
    "data.source": ("synthetic",),  # coco: the paper profile (a later issue)
    "features.mode": ("given_boxes", "detect"),
    "features.detector.nms_filter": (1, 2),
    "model.alignment_mode": ("MrSw", "MrAVGw", "MwSr", "symm", "sum", "mean"),
    "compat.image_first_token": ("unk", "cls"),
    "distill.mode": ("listnet", "triplet"),
}


# ---------------------------------------------------------------------------------------------------
# Loading


def _coerce(name: str, value, typ, source: str):
    origin = typing.get_origin(typ)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(typ)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {name} must be a list, got {value!r}")
        return tuple(_coerce(f"{name}[{i}]", v, item_type, source) for i, v in enumerate(value))
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: {name} must be a number, got {value!r}")
        if isinstance(value, (int, float, str)):
            try:
                return float(value)  # 8 -> 8.0; '1e-05' -> 1e-05
            except ValueError:
                pass
        raise ConfigError(f"{source}: {name} must be a number, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ConfigError(f"{source}: {name} must be an integer, got {value!r}")
        return int(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported field type {typ!r} for {name}")  # a bug in this module


def _build(cls, raw, prefix: str, source: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            name = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{source}: unknown key '{name}' (known: {', '.join(sorted(known))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        name = f"{prefix}.{f.name}" if prefix else f.name
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, raw[f.name], name, source)
        else:
            value = _coerce(name, raw[f.name], typ, source)
            if name in CHOICES and value not in CHOICES[name]:
                raise ConfigError(f"{source}: {name} must be one of {CHOICES[name]}, got {value!r}")
            kwargs[f.name] = value
    return cls(**kwargs)


def params_from_dict(raw: dict, source: str = "params") -> Params:
    """Build `Params` from a parsed mapping; missing keys take the defaults above."""
    params = _build(Params, raw, "", source)
    _check(params, source)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file. Raises `ConfigError` naming the file and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read params file ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return params_from_dict(raw or {}, str(path))


def _check(p: Params, source: str) -> None:
    """Cross-field checks: impossible combinations fail here, not an hour into a run."""

    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(f"{source}: {message}")

    for name in ("n_train", "n_val", "n_test", "captions_per_image", "image_size"):
        need(getattr(p.data, name) > 0, f"data.{name} must be positive")
    need(1 <= p.data.min_objects <= p.data.max_objects, "need 1 <= data.min_objects <= data.max_objects")
    need(p.eval.fold_size > 0, "eval.fold_size must be positive")
    need(p.eval.fold_size <= p.data.n_test, f"eval.fold_size ({p.eval.fold_size}) is larger than the test split (data.n_test = {p.data.n_test})")
    need(p.distill.temperature > 0, "distill.temperature must be positive")
    need(len(p.features.blocks) == 4, "features.blocks must list 4 stages (res2, res3, res4, res5)")
    det = p.features.detector
    need(0 < det.min_detections <= det.max_detections,
         "need 0 < features.detector.min_detections <= features.detector.max_detections")
    need(det.num_classes >= 2 and det.num_attributes >= 2,
         "features.detector.num_classes and num_attributes count background: at least 2")
    need(p.backbone.hidden_size % p.backbone.num_attention_heads == 0,
         "backbone.hidden_size must be divisible by backbone.num_attention_heads")
    need(p.backbone.hidden_size % p.model.matching_heads == 0,
         "backbone.hidden_size must be divisible by model.matching_heads")
    need(p.model.max_img_seq_length >= 2 or not p.compat.first_region_as_cls,
         "model.max_img_seq_length must be >= 2 when compat.first_region_as_cls (region 0 is not aligned)")
    for section in ("train_alignment", "distill"):
        cfg = getattr(p, section)
        need(cfg.epochs > 0 and cfg.batch_size > 1, f"{section}.epochs must be > 0 and batch_size > 1")
        need(cfg.lr > 0, f"{section}.lr must be positive")


def as_dict(obj) -> dict:
    """A plain dict of a config dataclass (tuples become lists), for JSON metadata."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {k: plain(v) if not isinstance(v, dict) else {kk: plain(vv) for kk, vv in v.items()}
            for k, v in dataclasses.asdict(obj).items()}
