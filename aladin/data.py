"""The image-caption dataset on disk, in the formats of the paper profile, and its readers.

One dataset folder holds
    images/...                     the images (synthetic: images/synthetic_%06d.png; COCO: hard links
                                   images/{train,val}2014/COCO_*.jpg, absent without data.coco_images)
    dataset_coco.json              Karpathy split file: {"dataset", "images": [{"filepath", "filename", "imgid",
                                   "split", "cocoid", "sentids", "sentences": [{"tokens", "raw", "imgid",
                                   "sentid"}]}]}; split is train | val | test (| restval for COCO)
    annotations/captions.json      COCO captions (pycocotools.coco.COCO reads it)
    annotations/instances.json     COCO instances: boxes [x, y, w, h] in pixels, categories = shapes
    test_img_keys_1k.tsv           the image ids of the single-1K protocol (vinvl_1k), VinVL coco_ir format
The readers assume nothing synthetic, so that the COCO profile can reuse them (ALADIN.md section 6.1).
Writers: `aladin.synthetic_data` (data.source synthetic) and `aladin.coco` (data.source coco).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .io import PipelineError, read_json

KARPATHY_FILE = "dataset_coco.json"
CAPTIONS_FILE = "annotations/captions.json"
INSTANCES_FILE = "annotations/instances.json"
IMAGES_DIR = "images"
SINGLE_1K_FILE = "test_img_keys_1k.tsv"  # the images of the vinvl_1k protocol (ALADIN.md 6.2)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    file_name: str  # relative to the dataset folder
    captions: tuple[str, ...]


@dataclass(frozen=True)
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    category: str


# ---------------------------------------------------------------------------------------------------
# Reading


def _field(entry, key, types, where: str):
    if not isinstance(entry, dict) or key not in entry:
        raise PipelineError(f"{where}: missing key '{key}'")
    value = entry[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise PipelineError(f"{where}: '{key}' has the wrong type ({type(value).__name__})")
    return value


def _entries(doc, key: str, path: Path) -> list:
    if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
        raise PipelineError(f"{path}: expected a JSON object with a '{key}' list")
    return doc[key]


def load_karpathy(dataset_dir, split: str, captions_per_image: int = 5) -> list[ImageRecord]:
    """The images of one split of `dataset_coco.json`, in file order, with all their captions.

    `train` includes Karpathy's `restval`. COCO images with more than five captions keep them all;
    callers take the first `captions_per_image` (ALADIN.md 7.1). Raises PipelineError naming the file
    when it is missing or malformed, the split is empty, or an image has too few captions.
    """
    path = Path(dataset_dir) / KARPATHY_FILE
    wanted = {"train": ("train", "restval")}.get(split, (split,))
    records = []
    for i, entry in enumerate(_entries(read_json(path), "images", path)):
        where = f"{path}: images[{i}]"
        if _field(entry, "split", str, where) not in wanted:
            continue
        image_id = entry.get("cocoid", entry.get("imgid"))  # Flickr30k files have no cocoid
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise PipelineError(f"{where}: needs an integer 'cocoid' or 'imgid'")
        folder = entry.get("filepath", "")
        if not isinstance(folder, str):
            raise PipelineError(f"{where}: 'filepath' has the wrong type ({type(folder).__name__})")
        file_name = str(Path(folder) / _field(entry, "filename", str, where))
        captions = tuple(_field(s, "raw", str, f"{where}.sentences[{j}]").strip()
                         for j, s in enumerate(_field(entry, "sentences", list, where)))
        if len(captions) < captions_per_image:
            raise PipelineError(f"{path}: image id {image_id} has {len(captions)} captions, "
                                f"fewer than captions_per_image = {captions_per_image}")
        records.append(ImageRecord(image_id, file_name, captions))
    if not records:
        raise PipelineError(f"{path}: split '{split}' has no images")
    return records


def load_instances(dataset_dir) -> dict[int, list[Box]]:
    """Boxes per image id from `annotations/instances.json` (every listed image, possibly with none)."""
    path = Path(dataset_dir) / INSTANCES_FILE
    doc = read_json(path)
    boxes: dict[int, list[Box]] = {}
    for i, image in enumerate(_entries(doc, "images", path)):
        boxes[_field(image, "id", int, f"{path}: images[{i}]")] = []
    names = {}
    for i, cat in enumerate(_entries(doc, "categories", path)):
        where = f"{path}: categories[{i}]"
        names[_field(cat, "id", int, where)] = _field(cat, "name", str, where)
    for i, ann in enumerate(_entries(doc, "annotations", path)):
        ann_id = _field(ann, "id", int, f"{path}: annotations[{i}]")
        where = f"{path}: annotation id {ann_id}"
        image_id, category_id = _field(ann, "image_id", int, where), _field(ann, "category_id", int, where)
        bbox = _field(ann, "bbox", list, where)
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise PipelineError(f"{where}: 'bbox' must be [x, y, w, h] numbers, got {bbox!r}")
        if image_id not in boxes:
            raise PipelineError(f"{where}: refers to unknown image id {image_id}")
        if category_id not in names:
            raise PipelineError(f"{where}: refers to unknown category id {category_id}")
        x, y, w, h = (float(v) for v in bbox)
        boxes[image_id].append(Box(x, y, x + w, y + h, names[category_id]))
    return boxes


def load_image(dataset_dir, record: ImageRecord) -> Image.Image:
    """The RGB image of `record`; a missing or undecodable file raises PipelineError naming the path."""
    path = Path(dataset_dir) / record.file_name
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise PipelineError(f"{path}: image file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise PipelineError(f"{path}: cannot decode image ({e})") from None


# ---------------------------------------------------------------------------------------------------
# Writing helpers shared by the writers


def dumps_compact(obj) -> str:
    """Deterministic JSON without indentation: the big annotation files, as COCO ships them. Indented
    output would force Python's slow pure-Python encoder (several seconds for the default dataset)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link `src` at `dst` (creating its folder), or copy it where linking fails (another file system,
    no hard links). Large inputs then cost no space twice; nothing writes to either name in place."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# ---------------------------------------------------------------------------------------------------
# Key files (VinVL coco_ir)


def read_img_keys(path) -> list[int]:
    """`test_img_keys.tsv` / `test_img_keys_1k.tsv`: one integer image id per line, in file order."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: not a text file") from None
    keys, seen = [], set()
    for number, line in enumerate(text.splitlines(), start=1):
        field = line.strip()
        if not re.fullmatch(r"\d+", field):
            raise PipelineError(f"{path}:{number}: expected one integer image id, got {line!r}")
        key = int(field)
        if key in seen:
            raise PipelineError(f"{path}:{number}: image id {key} appears twice")
        seen.add(key)
        keys.append(key)
    return keys


def key_rows(path, keys: list[int], split_ids: list[int], split: str = "test") -> np.ndarray:
    """int64 `[K]`: the position in the split of each image id of the key file `path`, sorted (split order).

    `keys` are the file's ids in file order, one per line (`read_img_keys`, which refuses
    blank lines, so key i is on line i + 1); a key outside the split is refused, naming its line.
    """
    if not keys:
        raise PipelineError(f"{path}: no image id in the file")
    position = {image_id: i for i, image_id in enumerate(split_ids)}
    rows = []
    for line, key in enumerate(keys, start=1):
        if key not in position:
            raise PipelineError(f"{path}:{line}: image id {key} is not an image of the {split} split")
        rows.append(position[key])
    return np.sort(np.asarray(rows, dtype=np.int64))
