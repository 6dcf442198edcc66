"""The synthetic world written as a dataset folder in the formats of the paper profile (see `aladin.data`).

Kept apart from the readers in `aladin.data`, so that the stages that only read a dataset do not depend
on how the synthetic one is generated. Besides the files of `aladin.data` the folder holds
`test_img_keys_1k.tsv`, the analogue of VinVL's single 1K test set (ALADIN.md 6.2, 7.5): `data.single_1k_size`
test image ids drawn from the seed, one per line in test-split order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import synthetic
from .config import DataConfig
from .data import CAPTIONS_FILE, IMAGES_DIR, INSTANCES_FILE, KARPATHY_FILE, SINGLE_1K_FILE, SPLITS, dumps_compact
from .io import PipelineError, atomic_path

# The key file's own random stream: a two-word seed [seed, 1000] is no image's [seed, k, stream]
# (aladin.synthetic), so drawing it shifts no other randomness.
SINGLE_1K_STREAM = 1000


def _split_of(index: int, cfg: DataConfig) -> str:
    """Images are numbered train first, then val, then test."""
    if index < cfg.n_train:
        return "train"
    return "val" if index < cfg.n_train + cfg.n_val else "test"


def single_1k_rows(seed: int, n_test: int, size: int) -> np.ndarray:
    """int64 `[size]`: sorted positions in the test split of the single-1K analogue (`size` capped at n_test).

    A uniform draw without replacement, redrawn while it is the first `size` test images (a fold-0 of that
    size), so the vinvl_1k protocol never silently repeats a fold of coco_1k_5fold when it can differ.
    """
    if size < 1:
        raise PipelineError(f"data.single_1k_size must be positive, got {size}")
    size = min(size, n_test)  # params validation refuses more; a library caller gets the whole split
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SINGLE_1K_STREAM])))
    while True:
        rows = np.sort(rng.choice(n_test, size=size, replace=False)).astype(np.int64)
        if size == n_test or rows[-1] != size - 1:  # sorted distinct rows 0..size-1 end at size - 1
            return rows


def write_dataset(out_dir, cfg: DataConfig, seed: int) -> dict[str, int]:
    """Generate the synthetic world and write the whole dataset folder atomically; returns counts."""
    with atomic_path(out_dir, directory=True) as tmp:
        return write_dataset_files(tmp, cfg, seed)


def write_dataset_files(tmp: Path, cfg: DataConfig, seed: int) -> dict[str, int]:
    """Generate the synthetic world into the existing empty folder `tmp`; returns counts."""
    if cfg.source != "synthetic":
        raise PipelineError(f"data.source = {cfg.source!r}: only the synthetic source can be generated")
    n_images = cfg.n_train + cfg.n_val + cfg.n_test
    karpathy, coco_images, coco_captions, coco_boxes = [], [], [], []
    categories = {name: i + 1 for i, name in enumerate(synthetic.SHAPES)}
    counts = {"images": n_images, "captions": 0, "objects": 0, **{s: 0 for s in SPLITS}}
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is an ordinary readable folder
    (tmp / IMAGES_DIR).mkdir()
    (tmp / "annotations").mkdir()
    for k in range(n_images):
        example = synthetic.generate(seed, k, cfg)
        image_id, file_name = k + 1, f"synthetic_{k:06d}.png"
        # No metadata chunks and fixed zlib settings: the same pixels give the same bytes. Huffman-only
        # coding (zlib strategy 2) halves the encoding time; LZ77 finds nothing to match in noise anyway.
        example.image.save(tmp / IMAGES_DIR / file_name, format="PNG", compress_level=6, compress_type=2)
        split = _split_of(k, cfg)
        sentences = []
        for text in example.captions:
            sentid = counts["captions"]
            sentences.append({"tokens": text.rstrip(".").split(), "raw": text, "imgid": k, "sentid": sentid})
            coco_captions.append({"id": sentid + 1, "image_id": image_id, "caption": text})
            counts["captions"] += 1
        karpathy.append({"filepath": IMAGES_DIR, "filename": file_name, "imgid": k, "split": split,
                         "cocoid": image_id, "sentids": [s["sentid"] for s in sentences],
                         "sentences": sentences})
        coco_images.append({"id": image_id, "file_name": file_name, "width": cfg.image_size,
                            "height": cfg.image_size})
        for obj in example.scene.objects:
            x1, y1, x2, y2 = obj.bbox
            counts["objects"] += 1
            coco_boxes.append({
                "id": counts["objects"], "image_id": image_id, "category_id": categories[obj.shape],
                "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], "area": round(synthetic.area(obj), 2),
                "iscrowd": 0, "segmentation": [_polygon(obj)],
                "attributes": [obj.size, obj.colour],  # VinVL-style attribute words of the object
            })
        counts[split] += 1
    first_test = cfg.n_train + cfg.n_val
    rows = single_1k_rows(seed, cfg.n_test, cfg.single_1k_size)
    (tmp / SINGLE_1K_FILE).write_text("".join(f"{first_test + int(r) + 1}\n" for r in rows))  # image id = k + 1
    counts["single_1k"] = len(rows)
    info = {"description": f"ALADIN synthetic shapes world, seed {seed}", "version": "1"}
    (tmp / KARPATHY_FILE).write_text(dumps_compact({"dataset": "coco", "images": karpathy}))
    (tmp / CAPTIONS_FILE).write_text(dumps_compact(
        {"info": info, "licenses": [], "images": coco_images, "annotations": coco_captions}))
    (tmp / INSTANCES_FILE).write_text(dumps_compact({
        "info": info, "licenses": [], "images": coco_images, "annotations": coco_boxes,
        "categories": [{"id": i, "name": name, "supercategory": "shape"} for name, i in categories.items()]}))
    return counts


def _polygon(obj: synthetic.SceneObject) -> list[float]:
    """COCO segmentation polygon [x1, y1, x2, y2, ...]."""
    return [round(v, 2) for p in synthetic.outline(obj) for v in p]
