"""TERAN (Messina et al., ACM TOMM 2021; mesnico/TERAN) as a recipe: MrSw over separately encoded token sets.

    regions [N, R, D+6] -> zero CLS slot + BoxConcatMLP -> RegionTE -> img_proj -+-> joint TE -> L2 -> V''
    caption ids [N, L]  -> BERT (first `text_layers` layers, fine-tuned) -> cap_proj -+-> joint TE -> L2 -> W''
    S(I, C) = MrSw(V'' minus slot 0, W'' words 1..cap_len-3)        (PEERS.md 3.2-3.3)

OPTIONAL PROJECT EXTENSION, not the paper's setting: "TERAN on VinVL regions" (PEERS.md 3.6). TERAN proper
reads BUTD features (36 x 2048) with pixel boxes divided by the image size; here the regions are the
pipeline's own VinVL-layout rows, D feature values followed by VinVL's 6 geometry values
(x1/W, y1/H, x2/W, y2/H, w/W, h/H). The normalised box is the first four geometry values and TERAN's area
(x2-x1)(y2-y1) of the normalised box is (w/W)(h/H). Object tags in `ImageInputs` are not used, and regions
are the first `max_img_seq_length` rows (VinVL's <= 34, not BUTD's fixed 36). Captions are cut to the
pipeline's `max_seq_length` (TERAN does not truncate).

The text backbone is the project's backbone folder (`aladin.backbone.load_backbone`, Oscar layout) run on
text only, as ALADIN's caption pass does, truncated to its first `text_layers` layers; the paper uses
bert-base-uncased with 6 layers (`backbone.init: bert-base-uncased`). Its image-only modules
(`img_embedding`, the image LayerNorm) are dropped: TERAN has its own region path.

Reps are the tokens AFTER selection (`select_alignment_tokens`: slot 0 and [CLS]/[SEP]/last wordpiece
dropped, L2-normalised), so `score` is exactly `alignment_scores` on them:
    {"tokens": [N, L', d_emb] float, "tokens_mask": [N, L'] bool, True = valid}.

Every TransformerEncoder uses a ReLU that is not `F.relu` itself, which keeps PyTorch's encoder-layer fast
path off: that path (eval mode without grad) runs other kernels, so reps would differ in the last bits
between validation and training-time encoding (PEERS.md 3.6 porting notes). Padding masks are always given,
which keeps the attention module's own fast path off as well (it refuses float masks).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import OscarBackbone, load_backbone
from ..io import PipelineError
from ..losses import hinge_triplet
from ..scoring import MODES, alignment_scores, select_alignment_tokens
from ..tokenization import ImageInputs, TextInputs
from .base import Reps, RetrievalRecipe

GEOMETRY = 6  # VinVL's per-region geometry values after the D feature values
BOX_INPUTS = 5  # TERAN's x1, y1, x2, y2, area


@dataclass(frozen=True)
class TeranConfig:
    """One params section for the recipe: architecture, score, loss and training schedule.

    Defaults are the embedded (small, CPU) profile; `PAPER` holds the paper's values.
    """

    d_img: int = 64  # region TE width (paper 2048)
    region_layers: int = 1  # region TE depth (paper 4)
    d_emb: int = 64  # joint embedding width per token (paper 1024)
    joint_layers: int = 1  # joint TE depth (paper 2)
    heads: int = 4  # attention heads of every TE (paper 4)
    ffn: int = 128  # feed-forward width of every TE (paper 2048)
    dropout: float = 0.1
    text_layers: int = 2  # BERT layers kept (paper 6 of bert-base-uncased)
    shared_te: bool = False  # one joint TE for both modalities (the `_sharedTE` configs)
    alignment_mode: str = "MrSw"
    zero_fill: bool = True  # TERAN's masked entries are 0 before the max (quirk Q7); False: -inf
    margin: float = 0.2
    max_violation: bool = True
    weight_alignment: float = 1.0  # the only loss term
    # training
    lr: float = 5e-4  # one Adam lr for every parameter, BERT included (paper 1e-5, from pretrained BERT)
    epochs: int = 4
    batch_size: int = 32
    lr_step: int = 3  # StepLR: lr * lr_gamma ** (epoch // lr_step)
    lr_gamma: float = 0.1
    grad_clip: float = 2.0  # global norm
    warmup_iters: int = 0  # linear lr warm-up over the first iterations (paper: 0 on COCO, 1,000 on Flickr30k)

    def __post_init__(self):
        if self.alignment_mode not in MODES:
            raise ValueError(f"teran.alignment_mode: must be one of {', '.join(MODES)}, got {self.alignment_mode!r}")
        for name in ("d_img", "region_layers", "d_emb", "joint_layers", "heads", "ffn", "text_layers",
                     "epochs", "batch_size", "lr_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"teran.{name}: must be >= 1, got {getattr(self, name)!r}")
        for name in ("d_img", "d_emb"):
            if getattr(self, name) % self.heads:
                raise ValueError(f"teran.{name}: {getattr(self, name)} is not divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"teran.dropout: must lie in [0, 1), got {self.dropout!r}")
        if self.warmup_iters < 0:
            raise ValueError(f"teran.warmup_iters: must be >= 0, got {self.warmup_iters!r}")

    def loss_weights(self) -> dict[str, float]:
        return {"alignment": self.weight_alignment}


CONFIG = TeranConfig  # the name `aladin.peers` looks up


# The paper's values (PEERS.md 3.4, configs/teran_coco_MrSw.yaml). Flickr30k differs in batch size 30 and a
# linear warm-up over the first 1,000 iterations (`PAPER_FLICKR30K`, pytorch_warmup's LinearWarmup).
PAPER = {
    "d_img": 2048, "region_layers": 4, "d_emb": 1024, "joint_layers": 2, "heads": 4, "ffn": 2048,
    "dropout": 0.1, "text_layers": 6, "shared_te": False, "alignment_mode": "MrSw", "zero_fill": True,
    "margin": 0.2, "max_violation": True, "weight_alignment": 1.0,
    "lr": 1e-5, "epochs": 30, "batch_size": 40, "lr_step": 20, "lr_gamma": 0.1, "grad_clip": 2.0,
    "warmup_iters": 0,
}
PAPER_FLICKR30K = dict(PAPER, batch_size=30, warmup_iters=1000)


def _relu(x: Tensor) -> Tensor:
    # Not `F.relu` itself, so nn.TransformerEncoderLayer never takes its fast path (module docstring).
    return F.relu(x)


def transformer_encoder(width: int, layers: int, heads: int, ffn: int, dropout: float) -> nn.TransformerEncoder:
    """Post-LN, ReLU, batch-first TransformerEncoder with PyTorch's defaults otherwise (eps 1e-5, no final norm)."""
    layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout, activation=_relu, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class BoxConcatMLP(nn.Module):
    """TERAN's "concat-and-process" position encoding: Lin(D+5 -> d) -> ReLU -> Lin(d -> d) on [f; box; area]."""

    def __init__(self, feature_dim: int, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(feature_dim + BOX_INPUTS, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, feats: Tensor, boxes: Tensor, area: Tensor) -> Tensor:
        """feats (N, R, D), boxes (N, R, 4), area (N, R) -> (N, R, d)."""
        return self.mlp(torch.cat([feats, boxes, area[..., None]], dim=-1))


def _pad_mask(lengths: Tensor, width: int) -> Tensor:
    """Bool (N, width), True = padding (nn.TransformerEncoder's key padding convention)."""
    return torch.arange(width, device=lengths.device)[None, :] >= lengths[:, None]


class Teran(RetrievalRecipe):
    name = "teran"
    index_kind = "set"

    def __init__(self, cfg: TeranConfig, text_backbone: OscarBackbone, img_feature_dim: int):
        super().__init__()
        if img_feature_dim <= GEOMETRY:
            raise ValueError(f"img_feature_dim must exceed the {GEOMETRY} geometry values, got {img_feature_dim}")
        self.cfg = cfg
        self.img_feature_dim = img_feature_dim
        feature_dim = img_feature_dim - GEOMETRY
        # image path
        self.box_mlp = BoxConcatMLP(feature_dim, cfg.d_img)
        self.region_te = transformer_encoder(cfg.d_img, cfg.region_layers, cfg.heads, cfg.ffn, cfg.dropout)
        self.img_proj = nn.Linear(cfg.d_img, cfg.d_emb)
        # text path
        self.text_backbone = text_backbone
        self.cap_proj = nn.Linear(text_backbone.config.hidden_size, cfg.d_emb)
        # joint stage; a shared stack is registered once, so the state dict holds no tensor twice (safetensors
        # refuses shared tensors)
        self.img_joint_te = transformer_encoder(cfg.d_emb, cfg.joint_layers, cfg.heads, cfg.ffn, cfg.dropout)
        self.txt_joint_te = (None if cfg.shared_te else
                             transformer_encoder(cfg.d_emb, cfg.joint_layers, cfg.heads, cfg.ffn, cfg.dropout))

    def text_joint_te(self) -> nn.TransformerEncoder:
        return self.img_joint_te if self.txt_joint_te is None else self.txt_joint_te

    # ---- encoders ---------------------------------------------------------------------------------
    def image_tokens(self, images: ImageInputs) -> tuple[Tensor, Tensor]:
        """Joint-TE outputs before selection: (N, 1 + R, d_emb) with slot 0 = CLS, and lengths 1 + feat_len."""
        x = images.trimmed()
        feats = x.img_feats  # (N, R, D + 6)
        if feats.shape[-1] != self.img_feature_dim:
            raise ValueError(f"image features have {feats.shape[-1]} values per region, the recipe was built "
                             f"for img_feature_dim {self.img_feature_dim}")
        d = self.img_feature_dim - GEOMETRY
        geometry = feats[..., d:]  # (N, R, 6)
        # TERAN's zero CLS slot: zero feature, zero box, zero area at index 0.
        f = F.pad(feats[..., :d], (0, 0, 1, 0))  # (N, 1 + R, D)
        boxes = F.pad(geometry[..., :4], (0, 0, 1, 0))  # (N, 1 + R, 4)
        area = F.pad(geometry[..., 4] * geometry[..., 5], (1, 0))  # (N, 1 + R)
        lengths = x.lengths + 1  # (N,)
        pad = _pad_mask(lengths, f.shape[1])  # (N, 1 + R)
        z = self.region_te(self.box_mlp(f, boxes, area), src_key_padding_mask=pad)  # (N, 1 + R, d_img)
        v = self.img_joint_te(self.img_proj(z), src_key_padding_mask=pad)  # (N, 1 + R, d_emb)
        return v, lengths

    def text_tokens(self, texts: TextInputs) -> tuple[Tensor, Tensor]:
        """Joint-TE outputs before selection: (N, L, d_emb) with position 0 = [CLS], and lengths cap_len."""
        x = texts.trimmed()
        h = self.text_backbone.forward_text(x.input_ids, x.attention_mask)  # (N, L, H)
        pad = _pad_mask(x.lengths, h.shape[1])  # (N, L)
        w = self.text_joint_te()(self.cap_proj(h), src_key_padding_mask=pad)  # (N, L, d_emb)
        return w, x.lengths

    def encode_images(self, images: ImageInputs) -> Reps:
        v, lengths = self.image_tokens(images)
        none = v.new_zeros((0, 3, v.shape[-1]))  # no caption: selection runs on the image side only
        tok, mask, _, _ = select_alignment_tokens(v, lengths, none, lengths[:0])
        return {"tokens": tok, "tokens_mask": mask}  # (N, R, d_emb), (N, R): regions without the CLS slot

    def encode_texts(self, texts: TextInputs) -> Reps:
        w, lengths = self.text_tokens(texts)
        none = w.new_zeros((0, 1, w.shape[-1]))  # no image
        _, _, tok, mask = select_alignment_tokens(none, lengths[:0], w, lengths)
        return {"tokens": tok, "tokens_mask": mask}  # (N, L - 3, d_emb), (N, L - 3): words 1..cap_len-3

    # ---- score and loss ---------------------------------------------------------------------------
    def score(self, img: Reps, txt: Reps, chunk_size: int | None = None) -> Tensor:
        return alignment_scores(img["tokens"], img["tokens_mask"], txt["tokens"], txt["tokens_mask"],
                                mode=self.cfg.alignment_mode, zero_fill=self.cfg.zero_fill,
                                chunk_size=chunk_size)  # (Ni, Nt)

    def losses(self, img: Reps, txt: Reps, epoch: int) -> dict[str, Tensor]:
        scores = self.score(img, txt)  # (B, B), positives on the diagonal
        return {"alignment": hinge_triplet(scores, self.cfg.margin, self.cfg.max_violation)}


def truncated_text_backbone(backbone_dir, text_layers: int) -> OscarBackbone:
    """The backbone folder's BERT with only its first `text_layers` layers and no image-input modules."""
    backbone = load_backbone(backbone_dir)
    available = len(backbone.encoder.layer)
    if text_layers > available:
        raise PipelineError(f"{Path(backbone_dir) / 'config.json'}: teran text_layers is {text_layers}, but the "
                            f"backbone has only {available} layers")
    backbone.encoder.layer = backbone.encoder.layer[:text_layers]
    backbone.config.num_hidden_layers = text_layers
    # Caption-only use: the image embedding would be dead weight in the optimiser and the saved state.
    del backbone.img_embedding
    backbone.LayerNorm = None
    return backbone


def build(cfg: TeranConfig, backbone_dir, img_feature_dim: int, seed: int) -> Teran:
    """A TERAN recipe: BERT from `backbone_dir`, every new layer initialised from `seed` alone (PyTorch's
    default initialisers, drawn under a forked RNG so the caller's random state is untouched; loading the
    backbone draws from it too, for weights the checkpoint then overwrites)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Teran(cfg, truncated_text_backbone(backbone_dir, cfg.text_layers), img_feature_dim)

