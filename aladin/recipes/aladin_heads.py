"""ALADIN's two heads behind the recipe contract, so code written for any recipe (the peers' evaluator, a
benchmark, a report row) takes them unchanged, and their numbers are the same as the pipeline's own path
(`aladin.retrieval`): tests/test_recipes_aladin.py compares them bit for bit.

These wrap a trained `aladin.model.Aladin` (the evaluate stage's `models/distill`); ALADIN's own training
stays in `aladin.train` (its two stages, distillation and resume state are not part of the contract).
"""
from __future__ import annotations

from torch import Tensor

from ..model import Aladin, AlignmentSet
from ..tokenization import ImageInputs, TextInputs
from .base import Reps, RetrievalRecipe


class _Heads(RetrievalRecipe):
    def __init__(self, model: Aladin):
        super().__init__()
        self.model = model


class AladinMatching(_Heads):
    """The distilled matching head: one unit vector per item, cosine score, a kNN index."""

    name = "aladin_matching"
    index_kind = "vector"

    def encode_images(self, images: ImageInputs) -> Reps:
        return {"emb": self.model.embed_images(self.model.image_tokens(images))}  # (N, H)

    def encode_texts(self, texts: TextInputs) -> Reps:
        return {"emb": self.model.embed_texts(self.model.text_tokens(texts))}  # (M, H)

    def score(self, img: Reps, txt: Reps, chunk_size: int | None = None) -> Tensor:
        return img["emb"] @ txt["emb"].T  # (N, M); one matmul needs no chunking

    def losses(self, img: Reps, txt: Reps, epoch: int) -> dict[str, Tensor]:
        raise NotImplementedError("ALADIN trains through aladin.train (stage 1 and the distillation stage)")


class AladinAlignment(_Heads):
    """The alignment head: selected word and region tokens, MrSw brute force over the gallery."""

    name = "aladin_alignment"
    index_kind = "set"

    def encode_images(self, images: ImageInputs) -> Reps:
        s = self.model.image_alignment_set(self.model.image_tokens(images))
        return {"tokens": s.tokens, "tokens_mask": s.mask}  # (N, R', H), (N, R')

    def encode_texts(self, texts: TextInputs) -> Reps:
        s = self.model.text_alignment_set(self.model.text_tokens(texts))
        return {"tokens": s.tokens, "tokens_mask": s.mask}  # (M, W', H), (M, W')

    def score(self, img: Reps, txt: Reps, chunk_size: int | None = None) -> Tensor:
        return self.model.alignment_scores(AlignmentSet(img["tokens"], img["tokens_mask"]),
                                           AlignmentSet(txt["tokens"], txt["tokens_mask"]), chunk_size)

    def losses(self, img: Reps, txt: Reps, epoch: int) -> dict[str, Tensor]:
        raise NotImplementedError("ALADIN trains through aladin.train (stage 1 and the distillation stage)")
