"""Benchmark of training: samples/s of the whole training step and of the data loader alone.

Writes synthetic inputs of the real shape (Karpathy JSON, VinVL `features.tsv`/`predictions.tsv` with their
`.lineidx`, `imageid2idx.json`) to a temporary folder with the real writer, so that the data path is the
real lazy reader (`aladin.pairs`), then times the training step of `aladin.train` (forward, backward,
gradient clipping, Adam) on a model with random weights: speed does not depend on their values.

    --size paper     BERT-base backbone (768/12/12/3072, vocab 30522), max_seq_length 50, 34 regions of
                     2054 values, matching head 2 layers x 4 heads, ff 768 (ALADIN.md 1, 5)
    --size embedded  the embedded default profile's shapes (params.yaml)

Run     python -m aladin.benchmark_training --size paper --device cuda --precision bf16 --num-workers 4
        python -m aladin.benchmark_training --size paper --recipe alignment,distillation,matching
        python -m aladin.benchmark_training --size embedded --steps 5      # small, on a CPU
"""
from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .backbone import SPECIAL_TOKENS, OscarBackbone, bert_config, load_tokenizer
from .config import LOSSES, BackboneConfig, CompatConfig, ModelConfig, TrainConfig
from .data import KARPATHY_FILE
from .distributed import Distributed
from .features import ImageRegions, write_region_files
from .io import write_json
from .model import Aladin
from .pairs import PairBatches, batch_inputs, default_workers, load_training_pairs, pair_loader
from .regions import RegionFeatures
from .train import Recipe, make_optimizer, train_step

SIZES = {
    "paper": (BackboneConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             max_position_embeddings=512),
              ModelConfig(max_seq_length=50, max_img_seq_length=34, img_feature_dim=2054, matching_ff=768),
              30522),
    "embedded": (BackboneConfig(), ModelConfig(), 0),  # vocab: the special tokens and the words below
}
# Words of the synthetic captions and object tags (all in the vocabulary, so no [UNK] in captions).
WORDS = ("a an the man woman dog cat person shirt table chair street car tree sky grass water building "
         "window plate food red blue green white black large small young old sitting standing walking "
         "holding riding next to on in of with near front behind").split()
TAGS = WORDS[3:25]


def write_vocab(path: Path, size: int) -> None:
    """BERT's special-token block, the words, then filler tokens up to `size` entries (0: no filler)."""
    tokens = list(SPECIAL_TOKENS) + [w for w in dict.fromkeys(WORDS)] + [".", ","]
    tokens += [f"filler{i}" for i in range(max(0, size - len(tokens)))]
    path.write_text("".join(f"{t}\n" for t in tokens))


def write_synthetic_inputs(folder, splits: dict[str, int], regions: int, feature_dim: int,
                           captions_per_image: int = 5, seed: int = 0, min_regions: int | None = None) -> None:
    """A Karpathy `dataset_coco.json` with `splits[name]` images per split and a VinVL feature folder
    `features/` with `regions` regions (or between `min_regions` and `regions`) of `feature_dim` (= D + 6)
    values per image, random contents."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    images, items = [], []
    image_id = 0
    for split, count in splits.items():
        for _ in range(count):
            image_id += 1
            captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 15)))) + " ."
                        for _ in range(captions_per_image)]
            images.append({"split": split, "cocoid": image_id, "filepath": "", "filename": f"{image_id}.jpg",
                           "sentences": [{"raw": c} for c in captions]})
            n = regions if min_regions is None else int(rng.integers(min_regions, regions + 1))
            x1, y1 = rng.uniform(0, 300, n), rng.uniform(0, 200, n)
            boxes = [(float(a), float(b), float(a + 100), float(b + 80)) for a, b in zip(x1, y1)]
            feats = np.abs(rng.standard_normal((n, feature_dim - 6))).astype(np.float32)  # post-ReLU-like
            items.append(ImageRegions(image_id, 640, 480, boxes, [str(t) for t in rng.choice(TAGS, size=n)],
                                      [1.0] * n, feats))
    write_json(folder / KARPATHY_FILE, {"images": images, "dataset": "coco"})
    write_region_files(folder / "features", items)


def _loop(loader, n: int):
    """`n` batches from `loader`, going round its epochs as often as needed."""
    return itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), n)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_benchmark(size: str, losses: tuple[str, ...], precision: str, device: str, batch_size: int, steps: int,
                  warmup: int, num_workers: int, n_images: int, regions: int = 50, freeze_backbone: bool = False,
                  seed: int = 0) -> dict:
    """Time `steps` training steps and `steps` loader batches after `warmup` each; returns the figures."""
    backbone_cfg, model_cfg, vocab_size = SIZES[size]
    device = torch.device(device)
    d = Distributed(0, 1, 0, device)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="aladin-benchmark-") as tmp:
        tmp = Path(tmp)
        write_synthetic_inputs(tmp, {"train": n_images}, regions, model_cfg.img_feature_dim, seed=seed)
        write_vocab(tmp / "vocab.txt", vocab_size)
        tokenizer = load_tokenizer(tmp)
        features = RegionFeatures(tmp / "features", expected_dim=model_cfg.img_feature_dim)
        compat = CompatConfig()
        pairs = load_training_pairs(tmp, features, "train", tokenizer, model_cfg, compat, 5)

        def loader():
            sampler = PairBatches(len(pairs), batch_size, torch.Generator().manual_seed(seed))
            return pair_loader(pairs, sampler, num_workers, device.type == "cuda", seed)

        # The loader alone: reading, decoding and tensorising regions, collating, pinning.
        batches = _loop(loader(), warmup + steps)
        for _ in itertools.islice(batches, warmup):
            pass
        start = time.perf_counter()
        loaded = sum(len(b[0]) for b in batches)
        loader_seconds = time.perf_counter() - start

        config = bert_config(backbone_cfg, len(tokenizer.vocab), model_cfg.img_feature_dim)
        model = Aladin(OscarBackbone(config), model_cfg, compat)
        cfg = TrainConfig(losses=losses, loss_weights=(1.0,) * len(losses), freeze_backbone=freeze_backbone,
                          precision=precision)
        recipe = Recipe.from_config(cfg, compat)
        params = recipe.prepare(model)
        model.to(device)
        recipe.train_mode(model)
        optimizer = make_optimizer(params, recipe.lr, device)
        batches = _loop(loader(), warmup + steps)
        for i, batch in enumerate(batches):
            if i == warmup:  # warm-up done: allocator, kernels, worker start-up are not timed
                _sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                trained = 0
            images, texts = batch_inputs(batch, device)
            loss, _ = train_step(model, recipe, images, texts, 0, optimizer, params, d)
            if i >= warmup:
                trained += len(batch[0])
        _sync(device)
        train_seconds = time.perf_counter() - start
    result = {
        "size": size, "losses": list(losses), "freeze_backbone": freeze_backbone, "device": str(device),
        "precision": precision, "batch_size": batch_size, "steps": steps, "warmup": warmup,
        "num_workers": num_workers, "images": n_images, "regions_per_image": regions,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in params),
        "training_samples_per_s": trained / train_seconds, "training_seconds": train_seconds,
        "loader_samples_per_s": loaded / loader_seconds, "loader_seconds": loader_seconds,
        "last_loss": float(loss), "threads": torch.get_num_threads(),
        # ru_maxrss is in KiB on Linux: the process's peak resident memory
        "peak_host_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    if device.type == "cuda":
        result["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="paper")
    p.add_argument("--recipe", default="alignment",
                   help="comma-separated losses (alignment, distillation, matching), as TrainConfig.losses")
    p.add_argument("--freeze-backbone", action="store_true", help="head-only recipes (freeze-teran)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps (training) and batches (loader)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num-workers", default="auto", help="a number, or auto (none on the CPU; on CUDA one per "
                                                         "spare CPU, at most 8)")
    p.add_argument("--images", type=int, default=256, help="synthetic images written (5 captions each)")
    p.add_argument("--regions", type=int, default=50, help="regions stored per image (VinVL keeps 10-100)")
    args = p.parse_args(argv)
    losses = tuple(x.strip() for x in args.recipe.split(",") if x.strip())
    problems = [x for x in losses if x not in LOSSES]
    if not losses or problems or len(set(losses)) != len(losses):
        print(f"error: --recipe must list distinct losses among {', '.join(LOSSES)}, got {args.recipe!r}",
              file=sys.stderr)
        return 1
    if args.freeze_backbone and "alignment" in losses:
        print("error: the alignment loss trains only the backbone, which --freeze-backbone freezes", file=sys.stderr)
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 1
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 2 or args.images < 1 or args.regions < 1:
        print("error: --steps, --images and --regions must be >= 1, --warmup >= 0, --batch-size >= 2", file=sys.stderr)
        return 1
    if args.num_workers != "auto" and not args.num_workers.isdigit():
        print(f"error: --num-workers must be a non-negative integer or auto, got {args.num_workers!r}", file=sys.stderr)
        return 1
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    workers = default_workers(torch.device(device)) if args.num_workers == "auto" else int(args.num_workers)
    result = run_benchmark(args.size, losses, args.precision, device, args.batch_size, args.steps, args.warmup,
                           workers, args.images, args.regions, args.freeze_backbone)
    print(json.dumps(result, indent=2, sort_keys=True))
    memory = f"peak host memory {result['peak_host_memory_mib']:.0f} MiB"
    if "peak_gpu_memory_mib" in result:
        memory += f", peak GPU memory {result['peak_gpu_memory_mib']:.0f} MiB"
    print(f"device: {result['device']}  precision: {result['precision']}  size: {args.size}  "
          f"recipe: {','.join(losses)}  batch: {args.batch_size}")
    print(f"training samples/s: {result['training_samples_per_s']:.2f}")
    print(f"data-loader samples/s: {result['loader_samples_per_s']:.2f}")
    print(memory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
