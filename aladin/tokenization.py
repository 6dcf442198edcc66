"""ALADIN's "disentangled" tensorisation: the text branch and the image branch (ALADIN.md 1.4).

Text branch (width L = max_seq_length): [CLS] + caption wordpieces (cut to L - 2) + [SEP] + [PAD]...,
all token types 0. `cap_len` = wordpieces + 2.

Image branch (width L + R, R = max_img_seq_length): tok0 + object-tag wordpieces (cut to L - 2) + [SEP] +
[PAD]... up to L, then R region rows (the first R stored rows, zero-padded). tok0 is [UNK] in the
original (quirk Q1, `compat.image_first_token`). Token types: 0 for tok0, 1 for the tags and their [SEP],
0 for padding. Attention: tags and regions attend to each other freely ("CLR").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TextInputs:
    input_ids: torch.Tensor  # (N, L) int64
    attention_mask: torch.Tensor  # (N, L) int64, 1 = real token
    lengths: torch.Tensor  # (N,) cap_len: wordpieces + [CLS] + [SEP]

    def __getitem__(self, index) -> "TextInputs":
        return TextInputs(self.input_ids[index], self.attention_mask[index], self.lengths[index])

    def trimmed(self) -> "TextInputs":
        """The same batch without the padding columns no item uses.

        Padded positions are masked out of attention, so real tokens get identical outputs; this only
        saves the compute the original spends on a fixed width.
        """
        width = int(self.lengths.max())
        return TextInputs(self.input_ids[:, :width], self.attention_mask[:, :width], self.lengths)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class ImageInputs:
    input_ids: torch.Tensor  # (N, L) tag text
    token_type_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L + R), 1 = attend
    img_feats: torch.Tensor  # (N, R, F) float32
    lengths: torch.Tensor  # (N,) feat_len = min(regions, R)

    def __getitem__(self, index) -> "ImageInputs":
        return ImageInputs(self.input_ids[index], self.token_type_ids[index], self.attention_mask[index],
                           self.img_feats[index], self.lengths[index])

    def trimmed(self) -> "ImageInputs":
        """The same batch without unused tag padding and region slots (see `TextInputs.trimmed`).

        Regions carry no position embedding and tags keep their positions, so outputs are unchanged.
        """
        width = self.input_ids.shape[1]
        tag_width = int(self.attention_mask[:, :width].sum(dim=1).max())
        n_regions = max(1, int(self.lengths.max()))
        keep = torch.cat([torch.arange(tag_width), width + torch.arange(n_regions)])
        return ImageInputs(self.input_ids[:, :tag_width], self.token_type_ids[:, :tag_width],
                           self.attention_mask[:, keep], self.img_feats[:, :n_regions], self.lengths)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _wordpiece_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))


def encode_captions(tokenizer, captions: list[str], max_seq_length: int) -> TextInputs:
    n, width = len(captions), max_seq_length
    ids = np.full((n, width), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    for i, caption in enumerate(captions):
        pieces = _wordpiece_ids(tokenizer, caption)[: width - 2]
        row = [tokenizer.cls_token_id, *pieces, tokenizer.sep_token_id]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        lengths[i] = len(row)
    return TextInputs(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(lengths))


def encode_images(tokenizer, tags: list[list[str]], feats: list[np.ndarray], max_seq_length: int,
                  max_img_seq_length: int, first_token: str = "unk") -> ImageInputs:
    """`tags[i]`: class names of image i in stored order; `feats[i]`: (n_regions, F) float32 rows."""
    if len(tags) != len(feats):
        raise ValueError(f"{len(tags)} tag lists for {len(feats)} feature arrays")
    n, width, regions = len(tags), max_seq_length, max_img_seq_length
    dim = feats[0].shape[1] if n else 0
    tok0 = tokenizer.unk_token_id if first_token == "unk" else tokenizer.cls_token_id
    ids = np.full((n, width), tokenizer.pad_token_id, dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64)
    mask = np.zeros((n, width + regions), dtype=np.int64)
    img = np.zeros((n, regions, dim), dtype=np.float32)
    lengths = np.zeros(n, dtype=np.int64)
    for i in range(n):
        pieces = _wordpiece_ids(tokenizer, " ".join(tags[i]))[: width - 2]
        row = [tok0, *pieces, tokenizer.sep_token_id]
        ids[i, : len(row)] = row
        types[i, 1: len(row)] = 1
        mask[i, : len(row)] = 1
        kept = feats[i][:regions]  # the first R rows as stored (ALADIN.md 1.4)
        img[i, : len(kept)] = kept
        mask[i, width: width + len(kept)] = 1
        lengths[i] = len(kept)
    return ImageInputs(torch.from_numpy(ids), torch.from_numpy(types), torch.from_numpy(mask),
                       torch.from_numpy(img), torch.from_numpy(lengths))
