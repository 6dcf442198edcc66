"""The alignment head's fine-grained score (the teacher). It has no parameters.

Two steps, as in mesnico/ALADIN `alad/loss.py` (`AlignmentContrastiveLoss`, inherited from TERAN):

1. `select_alignment_tokens` applies the selection rules of ALADIN.md section 1.5 to last-layer tokens
   and L2-normalises them.
2. `alignment_scores` computes a_rw = v_r . w_w for every image-caption pair and aggregates it into one
   score per pair (ALADIN.md section 2). The result has images on rows and captions on columns.

Masks in this module are True where a token is VALID (the original code passes pad masks, True = pad).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("MrSw", "MrAVGw", "MwSr", "symm", "sum", "mean")  # ALADIN.md section 2.2, minus scan-sentences


# ---------------------------------------------------------------------------------------------------
# Selection


def _length_mask(lengths: Tensor, width: int) -> Tensor:
    """Bool `[N, width]`, True at positions < length."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]  # (N, width)


def _check_lengths(name: str, lengths: Tensor, tokens: Tensor) -> None:
    if tokens.dim() != 3:
        raise ValueError(f"{name} tokens must be [N, L, D], got shape {tuple(tokens.shape)}")
    if lengths.shape != tokens.shape[:1]:
        raise ValueError(f"{name} lengths must be [N] = [{tokens.shape[0]}], got shape {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > tokens.shape[1]):
        raise ValueError(f"{name} lengths must lie in [0, {tokens.shape[1]}] (the padded width), "
                         f"got min {int(lengths.min())}, max {int(lengths.max())}")


def select_alignment_tokens(img_tokens: Tensor, img_lengths: Tensor, txt_tokens: Tensor, txt_lengths: Tensor,
                            drop_first_region: bool = True, drop_last_wordpiece: bool = True):
    """Pick and normalise the tokens the alignment head compares (ALADIN.md section 1.5).

    Args:
        img_tokens: `[Ni, R, D]` last-layer region tokens, position 0 = first detected region.
        img_lengths: int `[Ni]`, real regions per image (`feat_len`).
        txt_tokens: `[Nt, L, D]` last-layer caption tokens, position 0 = [CLS].
        txt_lengths: int `[Nt]`, real tokens per caption including [CLS] and [SEP] (`cap_len`).
        drop_first_region: compat Q5; the first region serves as the matching head's image "CLS" and is
            not aligned. Regions kept: 1 .. feat_len-1.
        drop_last_wordpiece: compat Q6; the original slices off [CLS] and the last two positions of the
            PADDED tensor and uses lengths cap_len-3, which also drops the last wordpiece before [SEP].
            Words kept: 1 .. cap_len-3. When False only [CLS] and [SEP] go: words 1 .. cap_len-2.

    Returns:
        (img_tok `[Ni, R', D]`, img_mask `[Ni, R']`, txt_tok `[Nt, W', D]`, txt_mask `[Nt, W']`): tokens
        L2-normalised (F.normalize, eps 1e-12, ALADIN.md 1.6), masks True = valid. A length that drops
        below 0 becomes 0 (an all-False mask row).
    """
    _check_lengths("image", img_lengths, img_tokens)
    _check_lengths("caption", txt_lengths, txt_tokens)
    # Normalising before slicing is the original's order; it is per token, so the order does not matter.
    img = F.normalize(img_tokens, dim=-1, eps=1e-12)  # (Ni, R, D)
    txt = F.normalize(txt_tokens, dim=-1, eps=1e-12)  # (Nt, L, D)

    if drop_first_region:
        img = img[:, 1:]  # (Ni, R-1, D)
        img_len = (img_lengths - 1).clamp(min=0)
    else:
        img_len = img_lengths
    if drop_last_wordpiece:
        txt = txt[:, 1:-2]  # (Nt, L-3, D): the original's t[:, 1:-2] (TERAN models/loss.py)
        txt_len = (txt_lengths - 3).clamp(min=0)
    else:
        txt = txt[:, 1:]  # (Nt, L-1, D); [SEP] at cap_len-1 is masked by the length below
        txt_len = (txt_lengths - 2).clamp(min=0)
    # With drop_last_wordpiece a caption that fills the padded width keeps cap_len-3 = L-3 words, which is
    # exactly the sliced width; the clamp below keeps any other case inside the tensor.
    img_mask = _length_mask(img_len.clamp(max=img.shape[1]), img.shape[1])  # (Ni, R')
    txt_mask = _length_mask(txt_len.clamp(max=txt.shape[1]), txt.shape[1])  # (Nt, W')
    return img, img_mask, txt, txt_mask


# ---------------------------------------------------------------------------------------------------
# Scores


def _aggregate(a: Tensor, valid: Tensor, img_mask: Tensor, txt_mask: Tensor, mode: str, zero_fill: bool) -> Tensor:
    """Aggregate a `[ni, nt, R, W]` grid of region-word similarities into `[ni, nt]` scores."""
    n_regions, n_words = a.shape[2], a.shape[3]
    if mode in ("sum", "mean"):
        a0 = a.masked_fill(~valid, 0.0)
        total = a0.sum(dim=(2, 3))  # (ni, nt)
        if mode == "sum":
            return total
        if zero_fill:
            # The original averages over the padded grid, zeros included (ALADIN.md 2.2), so the score
            # depends on the padding width.
            return total / max(n_regions * n_words, 1)
        count = valid.sum(dim=(2, 3)).clamp(min=1)  # (ni, nt); an empty grid scores 0
        return total / count

    def max_then_sum(over: int) -> Tensor:
        # Max over one axis (2 = regions, 3 = words), sum over the other.
        if a.shape[over] == 0:
            return a.new_zeros(a.shape[:2])  # nothing to take a max over: every set is empty
        if zero_fill:
            # Quirk Q7 (ALADIN.md 2.3): masked entries are 0 before the max, so a max over a set that has
            # a padded slot is clamped at >= 0. Masked rows/columns are all 0 and add nothing to the sum.
            return a.masked_fill(~valid, 0.0).amax(dim=over).sum(dim=-1)
        best = a.masked_fill(~valid, float("-inf")).amax(dim=over)  # (ni, nt, W) or (ni, nt, R)
        if over == 2:
            keep = txt_mask[None, :, :] & img_mask.any(dim=1)[:, None, None]  # (ni, nt, W)
        else:
            keep = img_mask[:, None, :] & txt_mask.any(dim=1)[None, :, None]  # (ni, nt, R)
        return best.masked_fill(~keep, 0.0).sum(dim=-1)  # an empty set contributes 0, never -inf/NaN

    if mode == "MrSw":
        return max_then_sum(2)
    if mode == "MrAVGw":
        n_valid_words = txt_mask.sum(dim=1).clamp(min=1).to(a.dtype)  # (nt,); 0 words -> score 0
        return max_then_sum(2) / n_valid_words[None, :]
    if mode == "MwSr":
        return max_then_sum(3)
    if mode == "symm":
        return max_then_sum(2) + max_then_sum(3)
    raise AssertionError(mode)  # unreachable: checked by alignment_scores


def _block(img_tokens, img_mask, txt_tokens, txt_mask, mode, zero_fill) -> Tensor:
    a = torch.einsum("ird,jwd->ijrw", img_tokens, txt_tokens)  # (ni, nt, R, W)
    valid = img_mask[:, None, :, None] & txt_mask[None, :, None, :]  # (ni, nt, R, W)
    return _aggregate(a, valid, img_mask, txt_mask, mode, zero_fill)


def alignment_scores(img_tokens: Tensor, img_mask: Tensor, txt_tokens: Tensor, txt_mask: Tensor,
                     mode: str = "MrSw", zero_fill: bool = True, chunk_size: int | None = None) -> Tensor:
    """Fine-grained image-caption scores from region and word tokens (ALADIN.md section 2).

    Args:
        img_tokens: `[Ni, R, D]` region tokens, already selected and L2-normalised.
        img_mask: bool `[Ni, R]`, True = valid region.
        txt_tokens: `[Nt, W, D]` word tokens, already selected and L2-normalised.
        txt_mask: bool `[Nt, W]`, True = valid word.
        mode: one of `MODES`, with a_rw = v_r . w_w over valid pairs:
            MrSw   sum over valid words of the max over regions (every released ALADIN config);
            MrAVGw MrSw / number of valid words;
            MwSr   sum over valid regions of the max over words;
            symm   MrSw + MwSr;
            sum    sum of a_rw over valid pairs;
            mean   zero_fill: mean over the padded R x W grid, zeros included (the original);
                   otherwise the mean over valid pairs.
        zero_fill: True reproduces quirk Q7 (masked entries are 0 before a max); False masks them with
            -inf. Either way a word (region) with no valid region (word) to compare with adds 0.
        chunk_size: at most this many images and this many captions per block, so memory holds
            chunk_size^2 x R x W similarities instead of Ni x Nt x R x W. Every reduction is the same
            as unchunked; the dot products may differ in the last bit, because BLAS (MKL) picks
            kernels by block shape. A given chunk_size always gives the same bytes.

    Returns:
        `[Ni, Nt]` scores, images on rows, captions on columns.
    """
    if mode not in MODES:
        raise ValueError(f"unknown alignment mode {mode!r}; allowed: {', '.join(MODES)}")
    if img_tokens.dim() != 3 or txt_tokens.dim() != 3 or img_tokens.shape[2] != txt_tokens.shape[2]:
        raise ValueError(f"tokens must be [Ni, R, D] and [Nt, W, D] with one D, got "
                         f"{tuple(img_tokens.shape)} and {tuple(txt_tokens.shape)}")
    if img_mask.shape != img_tokens.shape[:2] or txt_mask.shape != txt_tokens.shape[:2]:
        raise ValueError(f"masks must be [Ni, R] = {tuple(img_tokens.shape[:2])} and [Nt, W] = "
                         f"{tuple(txt_tokens.shape[:2])}, got {tuple(img_mask.shape)} and {tuple(txt_mask.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    img_mask, txt_mask = img_mask.bool(), txt_mask.bool()
    n_img, n_txt = img_tokens.shape[0], txt_tokens.shape[0]
    if chunk_size is None or (n_img <= chunk_size and n_txt <= chunk_size) or n_img == 0 or n_txt == 0:
        return _block(img_tokens, img_mask, txt_tokens, txt_mask, mode, zero_fill)

    rows = []
    for i in range(0, n_img, chunk_size):
        row = [_block(img_tokens[i:i + chunk_size], img_mask[i:i + chunk_size],
                      txt_tokens[j:j + chunk_size], txt_mask[j:j + chunk_size], mode, zero_fill)
               for j in range(0, n_txt, chunk_size)]  # each (ni, nt)
        rows.append(torch.cat(row, dim=1))  # (ni, Nt)
    return torch.cat(rows, dim=0)  # (Ni, Nt)
