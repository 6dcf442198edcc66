"""ALADIN: a shared backbone, a parameter-free alignment head (teacher) and a matching head (student).

    caption ids  -> backbone -> text tokens  T (N, Lt, H) -+-> alignment head: MrSw over word x region -> S_align
    tags+regions -> backbone -> region tokens V (N, R, H) -+-> matching head: shared 2-layer TE, position 0,
                                                               L2-normalised -> cosine -> S_match
(ALADIN.md 1.1). Similarity matrices always have images on rows and captions on columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import OscarBackbone
from .config import CompatConfig, ModelConfig
from .scoring import alignment_scores, select_alignment_tokens
from .tokenization import ImageInputs, TextInputs


@dataclass
class Tokens:
    """Last-layer tokens of one branch, cut to the batch's longest item."""

    tokens: torch.Tensor  # (N, L, H)
    lengths: torch.Tensor  # (N,) valid positions, from position 0


@dataclass
class AlignmentSet:
    """Selected, L2-normalised tokens as the alignment head consumes them (True = valid)."""

    tokens: torch.Tensor  # (N, L', H)
    mask: torch.Tensor  # (N, L') bool


class MatchingHead(nn.Module):
    """One TransformerEncoder shared by both modalities; the output at position 0 is the global embedding.

    PyTorch defaults as in the original (post-LayerNorm, ReLU, eps 1e-5, no final norm; ALADIN.md 1.7).
    With `image_cls` a learned vector is prepended to the region tokens and used as the image's position 0
    (the clean alternative to quirk Q5, where the first detected region plays that role).
    """

    def __init__(self, hidden: int, layers: int, heads: int, ff: int, dropout: float, image_cls: bool):
        super().__init__()
        layer = nn.TransformerEncoderLayer(hidden, heads, ff, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.image_cls = nn.Parameter(torch.zeros(1, 1, hidden)) if image_cls else None

    def forward(self, x: Tokens, is_image: bool) -> torch.Tensor:
        tokens, lengths = x.tokens, x.lengths
        if is_image and self.image_cls is not None:
            tokens = torch.cat([self.image_cls.expand(tokens.shape[0], 1, -1), tokens], dim=1)
            lengths = lengths + 1
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        pad = positions[None, :] >= lengths[:, None]  # (N, L) True = pad, as nn.TransformerEncoder wants
        out = self.encoder(tokens, src_key_padding_mask=pad)  # (N, L, H)
        first = out[:, 0]  # (N, H)
        # The original divides by the norm with no epsilon (alad/utils.py l2norm); 1e-12 only guards zeros.
        return first / first.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class Aladin(nn.Module):
    def __init__(self, backbone: OscarBackbone, model_cfg: ModelConfig, compat: CompatConfig):
        super().__init__()
        self.model_cfg = model_cfg
        self.compat = compat
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.matching_head = MatchingHead(hidden, model_cfg.matching_layers, model_cfg.matching_heads,
                                          model_cfg.matching_ff, model_cfg.matching_dropout,
                                          image_cls=not compat.first_region_as_cls)

    # ---- backbone passes -------------------------------------------------------------------------
    def text_tokens(self, x: TextInputs) -> Tokens:
        x = x.trimmed()
        out = self.backbone.forward_text(x.input_ids, x.attention_mask)  # (N, L, H)
        return Tokens(out[:, : int(x.lengths.max())], x.lengths)

    def image_tokens(self, x: ImageInputs) -> Tokens:
        x = x.trimmed()
        out = self.backbone.forward_image(x.input_ids, x.token_type_ids, x.attention_mask, x.img_feats)
        # Regions start after the tag text; the offset comes from the image input itself (quirk Q18 fixed).
        offset = x.input_ids.shape[1]
        return Tokens(out[:, offset: offset + int(x.lengths.max())], x.lengths)  # (N, R, H)

    # ---- heads ----------------------------------------------------------------------------------
    def alignment_sets(self, img: Tokens, txt: Tokens) -> tuple[AlignmentSet, AlignmentSet]:
        """The selection rules of ALADIN.md 1.5 (quirks Q5, Q6), tokens L2-normalised."""
        img_tok, img_mask, txt_tok, txt_mask = select_alignment_tokens(
            img.tokens, img.lengths, txt.tokens, txt.lengths,
            drop_first_region=self.compat.first_region_as_cls,
            drop_last_wordpiece=self.compat.drop_last_wordpiece)
        return AlignmentSet(img_tok, img_mask), AlignmentSet(txt_tok, txt_mask)

    def image_alignment_set(self, img: Tokens) -> AlignmentSet:
        return self.alignment_sets(img, _empty_like(img))[0]

    def text_alignment_set(self, txt: Tokens) -> AlignmentSet:
        return self.alignment_sets(_empty_like(txt), txt)[1]

    def alignment_scores(self, img: AlignmentSet, txt: AlignmentSet, chunk_size: int | None = None) -> torch.Tensor:
        return alignment_scores(img.tokens, img.mask, txt.tokens, txt.mask, mode=self.model_cfg.alignment_mode,
                                zero_fill=self.compat.alignment_zero_fill, chunk_size=chunk_size)  # (Ni, Nt)

    def embed_images(self, img: Tokens) -> torch.Tensor:
        return self.matching_head(img, is_image=True)  # (N, H), unit norm

    def embed_texts(self, txt: Tokens) -> torch.Tensor:
        return self.matching_head(txt, is_image=False)  # (N, H), unit norm


def _empty_like(x: Tokens) -> Tokens:
    """A zero-item batch standing in for the other modality when only one side is selected."""
    return Tokens(x.tokens[:0], x.lengths[:0])


def pad_sets(sets: list[AlignmentSet]) -> AlignmentSet:
    """Concatenate alignment sets of several batches, padding the token axis to the longest."""
    width = max(s.tokens.shape[1] for s in sets)
    tokens = torch.cat([F.pad(s.tokens, (0, 0, 0, width - s.tokens.shape[1])) for s in sets])
    mask = torch.cat([F.pad(s.mask, (0, width - s.mask.shape[1]), value=False) for s in sets])
    return AlignmentSet(tokens, mask)
