"""The recipe contract (PEERS.md section 2) and what every recipe shares."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tokenization import ImageInputs, TextInputs

# Per-item representations of one modality: named tensors whose first dimension is the item. A 2-D tensor
# is one vector per item; a 3-D tensor is a token set `[N, L, D]` with a bool `<name>_mask` `[N, L]` beside
# it when its items differ in length. Batches of different widths are concatenated by `concat_reps`.
Reps = dict[str, Tensor]


class RetrievalRecipe(nn.Module):
    """One retrieval system: separate encoders, a chunked score, named losses.

    Subclasses set `name` and `index_kind` ("vector": the score is a dot product of per-item vectors, so the
    gallery goes into a kNN index; "set": a brute-force score over token sets) and implement the four methods.
    """

    name: ClassVar[str] = ""
    index_kind: ClassVar[str] = ""

    def encode_images(self, images: ImageInputs) -> Reps:  # never sees a caption
        raise NotImplementedError

    def encode_texts(self, texts: TextInputs) -> Reps:  # never sees an image
        raise NotImplementedError

    def score(self, img: Reps, txt: Reps, chunk_size: int | None = None) -> Tensor:
        """`[Ni, Nt]` scores, images on rows; at most `chunk_size` items of each side per block."""
        raise NotImplementedError

    def losses(self, img: Reps, txt: Reps, epoch: int) -> dict[str, Tensor]:
        """Unweighted scalar loss terms on a batch of B matching pairs (pair i = image i, caption i)."""
        raise NotImplementedError


def concat_reps(parts: list[Reps]) -> Reps:
    """Concatenate batches of representations along the item axis; token sets are zero-padded (masks with
    False) to the widest batch."""
    if not parts:
        raise ValueError("no representations to concatenate")
    out = {}
    for key in parts[0]:
        tensors = [p[key] for p in parts]
        if tensors[0].dim() >= 3 or key.endswith("_mask"):
            width = max(t.shape[1] for t in tensors)
            tensors = [F.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1])) for t in tensors]
        out[key] = torch.cat(tensors)
    return out


def weighted_total(terms: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """sum_k weights[k] * terms[k]; a term without a weight is an error (every weight lives in params)."""
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise KeyError(f"no loss weight for {', '.join(missing)} (params loss_weights)")
    return sum(weights[k] * v for k, v in terms.items())
