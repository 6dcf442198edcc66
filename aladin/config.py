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
    source: str = "synthetic"  # synthetic: generated here | coco: MS-COCO 2014 + Karpathy split (downloads)
    coco_images: bool = True  # coco: fetch the 19 GB of images (not needed with features.source: vinvl_dump)
    n_train: int = 3000
    n_val: int = 250
    n_test: int = 500
    captions_per_image: int = 5
    image_size: int = 128  # square synthetic canvas, pixels
    min_objects: int = 2
    max_objects: int = 4
    background_noise: float = 12.0  # std of the per-pixel Gaussian noise, 0-255 scale
    # test images in test_img_keys_1k.tsv, the synthetic analogue of VinVL's single 1K set (COCO: the download)
    single_1k_size: int = 100


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
    # random: the seeded tiny BERT above (shape fields used) | vinvl: the VinVL coco_ir retrieval checkpoint
    # (paper) | bert-base-uncased: documented fallback when no VinVL checkpoint can be had (image input
    # layers initialised from the seed). The shape fields above are ignored unless init is random.
    init: str = "random"
    path: str = ""  # a local folder to use instead of downloading (vinvl or bert-base-uncased layout)


@dataclass(frozen=True)
class DetectorParams:
    """Detection mode (`features.mode: detect`): VinVL's box head and post-processing (VINVL.md 1.2, 4)."""

    # vinvl_vg_x152c4.pth: a path, "download" (downloads.vinvl_detector), or empty for seeded random weights
    checkpoint: str = ""
    # VG-SGG-dicts-vgoi6-clipped.json: a path, "download" (downloads.vinvl_labelmap), or empty for class_1, ...
    labelmap: str = ""
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

    source: str = "extract"  # extract: run the extractor below | vinvl_dump: an existing VinVL feature folder
    dump_dir: str = ""  # vinvl_dump: folder with features.tsv/.lineidx, predictions.tsv/.lineidx, imageid2idx.json
    mode: str = "given_boxes"  # given_boxes: boxes from the instance annotations | detect: the VinVL detector
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
class RemoteFileConfig:
    """One downloadable file: mirrors tried in order, and what the bytes must be (aladin/download.py)."""

    urls: tuple[str, ...] = ()
    sha256: str = ""  # lower-case hex; empty: not pinned yet, refused unless downloads.allow_unverified
    size: int = 0  # bytes; 0: not known


def _remote(*urls: str) -> "RemoteFileConfig":
    return RemoteFileConfig(urls=tuple(urls))


_COCO = "http://images.cocodataset.org"
# VINVL.md 3.1: the SGB README / pzzhang/VinVL DOWNLOAD.md blob first, then the MMF re-host of the same file.
_VINVL_BLOB = "https://penzhanwu2.blob.core.windows.net/sgg/sgg_benchmark/vinvl_model_zoo"
_VINVL_MMF = "https://dl.fbaipublicfiles.com/mmf/data/models/vinvl/detection"
# ALADIN.md 1.2: coco_ir/base/checkpoint-0132780 (VinVL_MODEL_ZOO.md, the mesnico/ALADIN README's azcopy line);
# reported missing upstream (ALADIN.md 6.7), hence backbone.path and the bert-base-uncased fallback.
_COCO_IR = "https://biglmdiag.blob.core.windows.net/vinvl/model_ckpts/coco_ir/base/checkpoint-0132780"
_BERT = ("https://huggingface.co/google-bert/bert-base-uncased/resolve/main",
         "https://hf-mirror.com/google-bert/bert-base-uncased/resolve/main")


@dataclass(frozen=True)
class DownloadsConfig:
    """Every remote input of the paper profile. The embedded default downloads nothing."""

    dir: str = "downloads"  # fetched files, kept between runs so a dropped download resumes; not a DVC output
    allow_unverified: bool = False  # accept files whose sha256 is not pinned (a warning names each one)
    retries: int = 3  # per mirror, for dropped connections and 5xx answers
    timeout: float = 60.0  # seconds without bytes before a connection counts as dropped
    karpathy_split: RemoteFileConfig = _remote(
        "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip")
    coco_annotations: RemoteFileConfig = _remote(f"{_COCO}/annotations/annotations_trainval2014.zip")
    coco_train2014: RemoteFileConfig = _remote(f"{_COCO}/zips/train2014.zip")
    coco_val2014: RemoteFileConfig = _remote(f"{_COCO}/zips/val2014.zip")
    vinvl_detector: RemoteFileConfig = _remote(f"{_VINVL_BLOB}/vinvl_vg_x152c4.pth", f"{_VINVL_MMF}/vinvl_vg_x152c4.pth")
    vinvl_labelmap: RemoteFileConfig = _remote(f"{_VINVL_BLOB}/VG-SGG-dicts-vgoi6-clipped.json")
    vinvl_backbone_config: RemoteFileConfig = _remote(f"{_COCO_IR}/config.json")
    vinvl_backbone_vocab: RemoteFileConfig = _remote(f"{_COCO_IR}/vocab.txt")
    vinvl_backbone_weights: RemoteFileConfig = _remote(f"{_COCO_IR}/pytorch_model.bin")
    bert_config: RemoteFileConfig = _remote(*(f"{u}/config.json" for u in _BERT))
    bert_vocab: RemoteFileConfig = _remote(*(f"{u}/vocab.txt" for u in _BERT))
    bert_weights: RemoteFileConfig = _remote(*(f"{u}/model.safetensors" for u in _BERT))
    # ALADIN.md 6.2: VinVL's single 1K test set (coco_ir); no URL: no file, and eval reports vinvl_1k as absent
    vinvl_test_img_keys_1k: RemoteFileConfig = _remote(
        "https://biglmdiag.blob.core.windows.net/vinvl/datasets/coco_ir/test_img_keys_1k.tsv")


@dataclass(frozen=True)
class TrainConfig:
    """One training stage, in the terms of the original configs (ALADIN.md 4.1, 5).

    `losses` is the original's `loss-type` (any of alignment, distillation, matching) and `loss_weights`
    its `loss-weights`; `freeze_backbone` is `freeze-teran`. epochs 0 passes the incoming model through
    unchanged (the single-stage recipes use it for stage 2).
    """

    losses: tuple[str, ...] = ("alignment",)
    loss_weights: tuple[float, ...] = (1.0,)
    freeze_backbone: bool = False
    epochs: int = 4
    batch_size: int = 32
    lr: float = 5.0e-4
    lr_step: int = 3  # StepLR step in epochs (paper: 15, 10 for the head-only recipes)
    lr_gamma: float = 0.1
    grad_clip: float = 2.0
    margin: float = 0.2  # hinge margin of the alignment and matching losses
    max_violation: bool = True
    distillation_mode: str = "listnet"  # the only mode of the released configs
    temperature: float = 6.0  # ListNet: multiplies student scores only (mesnico/ALADIN alad/loss.py)
    # Q2: the original never reads its activate_distillation_after key (always 0); honoured here.
    activate_distillation_after: int = 0
    precision: str = "fp32"  # fp32 (the original) | bf16 (autocast)
    # Optimiser steps between mid-epoch resume states (0: only at epoch ends); results do not depend on it.
    checkpoint_every: int = 100


def _stage1() -> "TrainConfig":
    return TrainConfig()


def _stage2() -> "TrainConfig":
    return TrainConfig(losses=("distillation",), freeze_backbone=True, epochs=3, lr=1.0e-3, lr_step=2)


@dataclass(frozen=True)
class EvalConfig:
    fold_size: int = 100  # images per fold of the "1K" analogue (COCO: 1000)
    batch_size: int = 64
    chunk_size: int = 32  # gallery items per alignment-scoring chunk
    latency_queries: int = 50  # caption queries timed per head
    qualitative_queries: int = 6
    rerank_k: tuple[int, ...] = (10, 50, 100)  # matching-head shortlist sizes re-ranked by the alignment head


@dataclass(frozen=True)
class BenchmarkConfig:
    """The benchmark stage: measured per-query cost of each retrieval mode (ALADIN.md 8)."""

    device: str = "auto"  # auto | cpu | cuda[:n]
    threads: int = 1  # torch and FAISS threads while timing; 0 = library defaults
    latency_queries: int = 50
    rerank_k: tuple[int, ...] = (10, 50, 100)
    crossencoder_pairs: int = 512  # (caption, image) pairs timed through the joint forward
    crossencoder_batch_size: int = 64
    sweep_max: int = 100000  # largest synthetic gallery of the FAISS sweep (paper profile: 1000000)
    sweep_queries: int = 100
    sweep_timed_queries: int = 50
    sweep_target_recall: float = 0.95  # approximate index tuned to reach this recall@10 against exact
    # sweep sizes up to this one also time the alignment head, on the test gallery's tokens tiled to size
    alignment_sweep_max: int = 5000


@dataclass(frozen=True)
class ReportConfig:
    qualitative_top_k: int = 5


@dataclass(frozen=True)
class PeersConfig:
    """ALADIN's neighbours as recipes (PEERS.md): `recipes` are trained and evaluated by the peer stages;
    `sections` holds each recipe's raw `peers.<name>` mapping, typed and checked by the recipe's own config
    class when a peer stage loads it (`aladin.peers.recipe_config`), so a new recipe touches only its module
    and its params. A section may exist for a recipe that is switched off."""

    recipes: tuple[str, ...] = ()
    sections: dict = field(default_factory=dict)


RECIPES_DIR = Path(__file__).parent / "recipes"


def _peers(raw, source: str) -> PeersConfig:
    if raw is None:
        return PeersConfig()
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: peers must be a mapping, got {raw!r}")
    sections = {k: v for k, v in raw.items() if k != "recipes"}
    recipes = _coerce("peers.recipes", raw.get("recipes", []), tuple[str, ...], source)
    for name in [*recipes, *sections]:
        if name in ("base", "__init__") or not (RECIPES_DIR / f"{name}.py").is_file():
            raise ConfigError(f"{source}: peers: unknown recipe '{name}' (a recipe is a module aladin/recipes/<name>.py)")
    for name, section in sections.items():
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{source}: peers.{name} must be a mapping, got {section!r}")
    if len(set(recipes)) != len(recipes):
        raise ConfigError(f"{source}: peers.recipes lists a recipe twice: {list(recipes)}")
    return PeersConfig(recipes, sections)


@dataclass(frozen=True)
class Params:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)
    downloads: DownloadsConfig = field(default_factory=DownloadsConfig)
    train_alignment: TrainConfig = field(default_factory=_stage1)
    distill: TrainConfig = field(default_factory=_stage2)
    eval: EvalConfig = field(default_factory=EvalConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)


LOSSES = ("alignment", "distillation", "matching")  # the original's loss-type names (ALADIN.md 3.5)

# Values a field may take, checked at load time so a typo fails before any work starts.
CHOICES = {
    "data.source": ("synthetic", "coco"),
    "backbone.init": ("random", "vinvl", "bert-base-uncased"),
    "features.source": ("extract", "vinvl_dump"),
    "features.mode": ("given_boxes", "detect"),
    "features.detector.nms_filter": (1, 2),
    "model.alignment_mode": ("MrSw", "MrAVGw", "MwSr", "symm", "sum", "mean"),
    "compat.image_first_token": ("unk", "cls"),
    "train_alignment.distillation_mode": ("listnet",),
    "distill.distillation_mode": ("listnet",),
    "train_alignment.precision": ("fp32", "bf16"),
    "distill.precision": ("fp32", "bf16"),
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
                number = float(value)  # 8 -> 8.0; '1e-05' -> 1e-05
            except ValueError:
                pass
            else:
                if number != number or number in (float("inf"), float("-inf")):  # YAML .nan / .inf
                    raise ConfigError(f"{source}: {name} must be a finite number, got {value!r}")
                return number
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


def _build(cls, raw, prefix: str, source: str, default=None):
    """`default` with the keys of `raw` replaced: a section's defaults are its field's default instance
    (stage 1 and stage 2 share `TrainConfig` with different defaults)."""
    default = cls() if default is None else default
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
            kwargs[f.name] = _build(typ, raw[f.name], name, source, getattr(default, f.name))
        else:
            value = _coerce(name, raw[f.name], typ, source)
            if name in CHOICES and value not in CHOICES[name]:
                raise ConfigError(f"{source}: {name} must be one of {CHOICES[name]}, got {value!r}")
            kwargs[f.name] = value
    return dataclasses.replace(default, **kwargs)


def params_from_dict(raw: dict, source: str = "params") -> Params:
    """Build `Params` from a parsed mapping; missing keys take the defaults above."""
    if isinstance(raw, dict) and "peers" in raw:  # recipe sections are typed by their own modules
        raw = dict(raw)
        peers = _peers(raw.pop("peers"), source)
    else:
        peers = PeersConfig()
    params = dataclasses.replace(_build(Params, raw, "", source), peers=peers)
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
    need(p.data.source != "synthetic" or p.eval.fold_size <= p.data.n_test,
         f"eval.fold_size ({p.eval.fold_size}) is larger than the test split (data.n_test = {p.data.n_test})")
    need(p.data.single_1k_size > 0, "data.single_1k_size must be positive")
    need(p.data.source != "synthetic" or p.data.single_1k_size <= p.data.n_test,
         f"data.single_1k_size ({p.data.single_1k_size}) is larger than the test split (data.n_test = {p.data.n_test})")
    need(len(p.features.blocks) == 4, "features.blocks must list 4 stages (res2, res3, res4, res5)")
    det = p.features.detector
    need(0 < det.min_detections <= det.max_detections,
         "need 0 < features.detector.min_detections <= features.detector.max_detections")
    need(det.num_classes >= 2 and det.num_attributes >= 2,
         "features.detector.num_classes and num_attributes count background: at least 2")
    # Ranges: a zero, negative or out-of-range value fails here, naming its key, not later as a
    # ZeroDivisionError, an empty batch or a NaN.
    positive = {"backbone": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                             "max_position_embeddings", "img_layer_norm_eps"),
                "features": ("groups", "width_per_group", "stem_channels", "min_size", "pooler_resolution",
                             "batch_size"),
                "model": ("max_seq_length", "max_img_seq_length", "matching_layers", "matching_heads",
                          "matching_ff"),
                "eval": ("batch_size", "chunk_size", "latency_queries", "qualitative_queries"),
                "report": ("qualitative_top_k",),
                "downloads": ("timeout",),
                "train_alignment": ("lr_step", "lr_gamma", "grad_clip"),
                "distill": ("lr_step", "lr_gamma", "grad_clip")}
    for section, names in positive.items():
        for name in names:
            value = getattr(getattr(p, section), name)
            need(value > 0, f"{section}.{name} must be positive, got {value}")
    need(0 <= p.seed < 2**32, f"seed must be in [0, 2**32), got {p.seed}")
    need(p.data.background_noise >= 0, f"data.background_noise must be >= 0, got {p.data.background_noise}")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        need(0 <= getattr(p.backbone, name) < 1, f"backbone.{name} must be in [0, 1), got {getattr(p.backbone, name)}")
    need(0 <= p.model.matching_dropout < 1, f"model.matching_dropout must be in [0, 1), got {p.model.matching_dropout}")
    need(p.model.img_feature_dim > 6, f"model.img_feature_dim is D + 6 and must be > 6, got {p.model.img_feature_dim}")
    need(p.backbone.init != "random" or p.model.max_seq_length <= p.backbone.max_position_embeddings,
         f"model.max_seq_length ({p.model.max_seq_length}) is larger than backbone.max_position_embeddings "
         f"({p.backbone.max_position_embeddings})")
    need(all(b >= 1 for b in p.features.blocks), f"features.blocks must be >= 1 each, got {list(p.features.blocks)}")
    need(p.features.min_size <= p.features.max_size,
         f"features.min_size ({p.features.min_size}) is larger than features.max_size ({p.features.max_size})")
    need(p.features.sampling_ratio >= 0, f"features.sampling_ratio must be >= 0, got {p.features.sampling_ratio}")
    need(0 <= det.score_thresh <= 1, f"features.detector.score_thresh must be in [0, 1], got {det.score_thresh}")
    for section in ("train_alignment", "distill"):
        cfg = getattr(p, section)
        need(cfg.margin >= 0, f"{section}.margin must be >= 0, got {cfg.margin}")
        need(cfg.activate_distillation_after >= 0,
             f"{section}.activate_distillation_after must be >= 0, got {cfg.activate_distillation_after}")
        need(all(w >= 0 for w in cfg.loss_weights), f"{section}.loss_weights must be >= 0, got {list(cfg.loss_weights)}")
    need(p.backbone.hidden_size % p.backbone.num_attention_heads == 0,
         "backbone.hidden_size must be divisible by backbone.num_attention_heads")
    need(p.backbone.hidden_size % p.model.matching_heads == 0,
         "backbone.hidden_size must be divisible by model.matching_heads")
    need(p.model.max_img_seq_length >= 2 or not p.compat.first_region_as_cls,
         "model.max_img_seq_length must be >= 2 when compat.first_region_as_cls (region 0 is not aligned)")
    for section in ("train_alignment", "distill"):
        cfg = getattr(p, section)
        need(cfg.epochs >= 0 and cfg.batch_size > 1, f"{section}.epochs must be >= 0 and batch_size > 1")
        need(cfg.lr > 0, f"{section}.lr must be positive")
        need(cfg.temperature > 0, f"{section}.temperature must be positive")
        need(cfg.checkpoint_every >= 0, f"{section}.checkpoint_every must be >= 0 (0: only at epoch ends)")
        need(len(cfg.losses) > 0, f"{section}.losses must name at least one loss")
        for loss in cfg.losses:
            need(loss in LOSSES, f"{section}.losses: unknown loss {loss!r} (known: {', '.join(LOSSES)})")
        need(len(set(cfg.losses)) == len(cfg.losses), f"{section}.losses names a loss twice")
        need(len(cfg.loss_weights) == len(cfg.losses),
             f"{section}.loss_weights must have one weight per loss ({len(cfg.losses)}), got {len(cfg.loss_weights)}")
        need(not (cfg.freeze_backbone and "alignment" in cfg.losses),
             f"{section}: the alignment loss trains only the backbone, which freeze_backbone freezes")
    need(all(k >= 1 for k in p.eval.rerank_k) and all(k >= 1 for k in p.benchmark.rerank_k),
         "eval.rerank_k and benchmark.rerank_k must be >= 1")
    b = p.benchmark
    need(b.threads >= 0, "benchmark.threads must be >= 0")
    need(min(b.sweep_max, b.crossencoder_pairs, b.crossencoder_batch_size, b.latency_queries, b.sweep_queries,
             b.sweep_timed_queries) >= 1, "benchmark sizes and counts must be >= 1")
    need(0 < b.sweep_target_recall <= 1, "benchmark.sweep_target_recall must be in (0, 1]")
    need(p.features.source != "vinvl_dump" or p.features.dump_dir,
         "features.source is vinvl_dump but features.dump_dir is empty")


def as_dict(obj) -> dict:
    """A plain dict of a config dataclass (tuples become lists), for JSON metadata."""

    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))
