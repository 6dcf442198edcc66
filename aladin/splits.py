"""One split of the dataset as model inputs: every image and every caption, tensorised once.

Captions are image-major (caption k belongs to image `image_of_caption[k]`), the order of the Karpathy
file; nothing downstream assumes a fixed number of captions per image except where a protocol says so.

This in-memory form serves validation and evaluation (VinVL's minival and the test split are small).
Training reads its regions lazily instead (`aladin.pairs`): the paper's training features are ~50 GB.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import CompatConfig, ModelConfig
from .data import ImageRecord, load_karpathy
from .regions import RegionFeatures
from .io import PipelineError
from .tokenization import ImageInputs, TextInputs, encode_captions, encode_images


@dataclass
class SplitInputs:
    records: list[ImageRecord]
    images: ImageInputs  # (N_images, ...)
    texts: TextInputs  # (N_captions, ...)
    captions: list[str]
    image_of_caption: torch.Tensor  # (N_captions,) int64 index into records


def split_records(dataset_dir, features: RegionFeatures, split: str) -> list[ImageRecord]:
    """The images of `split`, refusing the split if any of them has no region features."""
    records = load_karpathy(dataset_dir, split)
    missing = [r.image_id for r in records if r.image_id not in features]
    if missing:
        raise PipelineError(f"{features.directory}: no region features for {len(missing)} image(s) of split "
                            f"'{split}', e.g. image id {missing[0]}")
    return records


def split_captions(records: list[ImageRecord], captions_per_image: int) -> tuple[list[str], torch.Tensor]:
    """Captions image-major, and the index of each caption's image (N_captions,) int64."""
    captions, owner = [], []
    for i, r in enumerate(records):
        # The protocols use the first `captions_per_image` captions of each image (ALADIN.md 7.1).
        for c in r.captions[:captions_per_image]:
            captions.append(c)
            owner.append(i)
    return captions, torch.tensor(owner, dtype=torch.int64)


def load_split(dataset_dir, features: RegionFeatures, split: str, tokenizer, model_cfg: ModelConfig,
               compat: CompatConfig, captions_per_image: int) -> SplitInputs:
    records = split_records(dataset_dir, features, split)
    tags, feats = [], []
    for r in records:
        f, t = features[r.image_id]
        feats.append(f)
        tags.append(t)
    images = encode_images(tokenizer, tags, feats, model_cfg.max_seq_length, model_cfg.max_img_seq_length,
                           first_token=compat.image_first_token)
    captions, owner = split_captions(records, captions_per_image)
    texts = encode_captions(tokenizer, captions, model_cfg.max_seq_length)
    return SplitInputs(records, images, texts, captions, owner)


def training_pairs(n_captions: int, generator: torch.Generator) -> torch.Tensor:
    """A shuffled order of (image, caption) pairs: uniform over captions, so images repeat (ALADIN.md 3.1)."""
    return torch.randperm(n_captions, generator=generator)  # (N_captions,) caption indices


def batches(order: torch.Tensor, batch_size: int):
    """Consecutive slices of `order`; the last, smaller batch is kept unless it has a single pair."""
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        if len(chunk) > 1:
            yield chunk
