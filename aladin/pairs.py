"""Training data read lazily: (image, caption) pairs whose regions come off the disk one image at a time.

The paper's training features (113,287 images, VinVL's 2054-d regions, base64 in `features.tsv`) are about
50 GB, so training never holds them: a pair's image row is read by random access through `features.lineidx`
(`aladin.tsv.TSVFile`, `os.pread`, safe in forked or spawned DataLoader workers) and tensorised on its own.
Captions are small and are tokenised once, up front.

Batches are the original's (ALADIN.md 3.1, 5): uniform over captions, a fresh permutation per epoch from
one seeded generator, consecutive slices of `batch_size` pairs. The order is drawn in the main process by
`PairBatches`, never in a worker, so it is the same for any `num_workers`. Under data parallelism every
rank draws the same order and takes its contiguous slice of each global batch (`aladin.distributed`).
"""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import CompatConfig, ModelConfig
from .data import ImageRecord
from .regions import RegionFeatures
from .splits import batches, split_captions, split_records, training_pairs
from .tokenization import ImageInputs, TextInputs, encode_captions, encode_images

# One pair as the Dataset returns it: image inputs (input_ids (L,), token_type_ids (L,), attention_mask
# (L + R,), img_feats (R, F), feat_len ()) then caption inputs (input_ids (L,), attention_mask (L,), cap_len ()).
Pair = tuple[torch.Tensor, ...]


class TrainingPairs(Dataset):
    """Every (image, caption) pair of a split; item k is caption k with its image, tensorised.

    Captions are held tokenised (int32 ids, ~110 MB for COCO's 566K captions); regions are read from
    `features` when an item is asked for, so memory does not grow with the feature dump.
    """

    def __init__(self, records: list[ImageRecord], features: RegionFeatures, tokenizer, model_cfg: ModelConfig,
                 compat: CompatConfig, captions_per_image: int):
        self.image_ids = [r.image_id for r in records]
        self.features = features
        self.tokenizer = tokenizer
        self.max_seq_length = model_cfg.max_seq_length
        self.max_img_seq_length = model_cfg.max_img_seq_length
        self.first_token = compat.image_first_token
        captions, self.image_of_caption = split_captions(records, captions_per_image)  # (N_captions,)
        texts = encode_captions(tokenizer, captions, model_cfg.max_seq_length)
        self.caption_ids = texts.input_ids.to(torch.int32)  # (N_captions, L); ids < 2^31
        self.caption_lengths = texts.lengths  # (N_captions,) cap_len

    def __len__(self) -> int:
        return len(self.caption_lengths)

    def image(self, index: int) -> ImageInputs:
        """The image branch of image `index` of the split, a batch of one, read from the feature files."""
        feats, tags = self.features[self.image_ids[index]]
        return encode_images(self.tokenizer, [tags], [feats], self.max_seq_length, self.max_img_seq_length,
                             first_token=self.first_token)

    def __getitem__(self, k: int) -> Pair:
        img = self.image(int(self.image_of_caption[k]))
        ids = self.caption_ids[k].long()  # (L,)
        length = self.caption_lengths[k]
        # The mask encode_captions wrote: 1 on the first cap_len positions.
        mask = (torch.arange(ids.shape[0]) < length).long()  # (L,)
        return (img.input_ids[0], img.token_type_ids[0], img.attention_mask[0], img.img_feats[0],
                img.lengths[0], ids, mask, length)


def collate_pairs(items: list[Pair]) -> Pair:
    """Stack items into batch tensors (a plain tuple, so that the DataLoader can pin it)."""
    return tuple(torch.stack(column) for column in zip(*items))


def batch_inputs(batch: Pair, device: torch.device | str) -> tuple[ImageInputs, TextInputs]:
    """A collated batch as model inputs on `device` (asynchronous copies from pinned memory)."""
    t = [x.to(device, non_blocking=True) for x in batch]
    return ImageInputs(*t[:5]), TextInputs(*t[5:])


class PairBatches(Sampler[list[int]]):
    """Caption indices of each batch of an epoch: ALADIN's order, optionally one rank's slice of it.

    Each pass draws `torch.randperm(n_pairs)` from `generator` and cuts it into consecutive global batches
    of `batch_size` (the last, smaller one kept unless it holds a single pair). With `world_size` > 1,
    rank r yields the r-th of `world_size` contiguous slices of every global batch (sizes differ by at most
    one); a final batch with fewer pairs than ranks is skipped so that no rank gets an empty slice.
    The generator's state at the start of an epoch is what a resumed run must restore; `skip_next` then
    resumes that epoch part-way.
    """

    def __init__(self, n_pairs: int, batch_size: int, generator: torch.Generator, rank: int = 0,
                 world_size: int = 1):
        if batch_size < max(2, world_size):
            raise ValueError(f"batch_size {batch_size} must be at least 2 and at least the number of ranks "
                             f"({world_size})")
        self.n_pairs, self.batch_size, self.generator = n_pairs, batch_size, generator
        self.rank, self.world_size = rank, world_size
        self._skip = 0

    def skip_next(self, n: int) -> None:
        """Leave out the first `n` batches of the next pass. The pass still draws its whole order, so the
        generator ends it where an uninterrupted epoch would; the skipped pairs are never read."""
        self._skip = n

    def __iter__(self):
        skip, self._skip = self._skip, 0
        index = 0
        for chunk in batches(training_pairs(self.n_pairs, self.generator), self.batch_size):
            if len(chunk) < self.world_size:
                continue
            index += 1
            if index > skip:
                yield torch.tensor_split(chunk, self.world_size)[self.rank].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.n_pairs, self.batch_size)
        return full + (rest > 1 and rest >= self.world_size)


def load_training_pairs(dataset_dir, features: RegionFeatures, split: str, tokenizer, model_cfg: ModelConfig,
                        compat: CompatConfig, captions_per_image: int) -> TrainingPairs:
    """The pairs of `split` of the Karpathy file in `dataset_dir` (every image must have features)."""
    records = split_records(dataset_dir, features, split)
    return TrainingPairs(records, features, tokenizer, model_cfg, compat, captions_per_image)


def default_workers(device: torch.device, world_size: int = 1) -> int:
    """DataLoader workers for a run on `device`: none on the CPU, where worker processes compete with the
    model's own threads (embedded model, 2 cores: 740 samples/s in-process, 20 with 2 workers); on CUDA
    one per spare CPU, at most 8, the CPUs shared among the ranks of the machine."""
    if device.type == "cpu":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // world_size - 1))


def pair_loader(pairs: TrainingPairs, sampler: PairBatches, num_workers: int, pin_memory: bool,
                seed: int) -> DataLoader:
    """The DataLoader of training: `num_workers` processes read and tensorise pairs, the main process orders
    them. Its own generator seeds the workers, so creating it leaves the global torch RNG (dropout) alone."""
    return DataLoader(pairs, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_pairs,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))
