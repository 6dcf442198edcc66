"""The synthetic world written as a dataset folder in the formats of the paper profile (see `aladin.data`).

Kept apart from the readers in `aladin.data`, so that the stages that only read a dataset do not depend
on how the synthetic one is generated.
"""
from __future__ import annotations

from pathlib import Path

from . import synthetic
from .config import DataConfig
from .data import CAPTIONS_FILE, IMAGES_DIR, INSTANCES_FILE, KARPATHY_FILE, SPLITS, dumps_compact
from .io import PipelineError, atomic_path


def _split_of(index: int, cfg: DataConfig) -> str:
    """Images are numbered train first, then val, then test."""
    if index < cfg.n_train:
        return "train"
    return "val" if index < cfg.n_train + cfg.n_val else "test"


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
