"""Retrieval recipes: ALADIN's neighbours (TERAN, SelfAlign) behind one contract (PEERS.md section 2).

Every recipe encodes images and texts separately (`encode_images`, `encode_texts`), scores any image set
against any caption set in chunks (`score`), returns its named loss terms on a batch whose positives lie on
the diagonal (`losses`), and says whether its gallery is a vector index (kNN) or a set index (brute force).
The evaluator, the benchmark and the report take any recipe through this contract.
"""
from __future__ import annotations

from .base import Reps, RetrievalRecipe, concat_reps, weighted_total

__all__ = ["Reps", "RetrievalRecipe", "concat_reps", "weighted_total"]
