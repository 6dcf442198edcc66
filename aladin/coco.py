"""The MS-COCO 2014 dataset folder of the paper profile, built from the upstream downloads (ALADIN.md 6.1).

Inputs, from the `downloads` catalogue (aladin.download):
    karpathy_split     caption_datasets.zip -> dataset_coco.json (Karpathy split; restval is train)
    coco_annotations   annotations_trainval2014.zip -> annotations/captions_{train,val}2014.json and
                       annotations/instances_{train,val}2014.json
    coco_train2014     train2014.zip -> train2014/COCO_train2014_%012d.jpg      (only with data.coco_images)
    coco_val2014       val2014.zip -> val2014/COCO_val2014_%012d.jpg
    vinvl_test_img_keys_1k  VinVL's coco_ir test_img_keys_1k.tsv, the single 1K test set (ALADIN.md 6.2, 7.5);
                       not fetched when the entry has no URL (the file is then absent, and so is vinvl_1k)
Output: the dataset folder layout of `aladin.data`, the same the synthetic source writes:
    dataset_coco.json              the Karpathy file, each image's `filepath` prefixed with `images/`, so that
                                   `load_karpathy`'s file names resolve inside the dataset folder
    images/{train,val}2014/*.jpg   hard links to the extracted files (copies where linking fails); none
                                   without data.coco_images (features from a VinVL dump need no pixels)
    annotations/captions.json      captions_train2014 + captions_val2014, merged (COCO format)
    annotations/instances.json     instances_train2014 + instances_val2014, merged
    test_img_keys_1k.tsv           the 1K key file's image ids, one per line in file order, each checked to be an
                                   image of the Karpathy test split (only when fetched)
The COCO files are indexed with pycocotools (`pycocotools.coco.COCO`), and every Karpathy image must be a
COCO image with the same file name. JSON is written with sorted keys and no indentation, so the same
inputs give the same bytes.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path

from .config import DownloadsConfig
from .data import (CAPTIONS_FILE, IMAGES_DIR, INSTANCES_FILE, KARPATHY_FILE, SINGLE_1K_FILE, _entries, _field,
                   dumps_compact, key_rows, link_or_copy, read_img_keys)
from .download import fetch_param
from .io import PipelineError, atomic_path, read_json

PARTS = ("train2014", "val2014")  # COCO 2014 image folders; Karpathy's `filepath` names one of them
KARPATHY_SPLITS = ("train", "restval", "val", "test")


@dataclass(frozen=True)
class Sources:
    """The extracted upstream files."""

    karpathy: Path  # dataset_coco.json
    captions: dict[str, Path]  # part -> captions_<part>.json
    instances: dict[str, Path]  # part -> instances_<part>.json
    images: dict[str, Path] = field(default_factory=dict)  # part -> folder holding <part>/*.jpg; empty: no images
    single_1k: Path | None = None  # test_img_keys_1k.tsv; None: downloads.vinvl_test_img_keys_1k has no URL


def _find(folder: Path, relative: str, what: str) -> Path:
    """`folder/relative`, or the one file or folder of that name deeper inside (an archive with an extra
    top-level folder); else a PipelineError naming the archive's entry."""
    direct = folder / relative
    if direct.exists():
        return direct
    name = Path(relative).name
    found = sorted(p for p in folder.rglob(name) if p.as_posix().endswith(relative))
    if len(found) != 1:
        raise PipelineError(f"{folder}: {'no' if not found else 'more than one'} {relative} in the archive of "
                            f"downloads.{what}")
    return found[0]


def fetch_sources(downloads: DownloadsConfig, coco_images: bool, **download_kwargs) -> Sources:
    """Fetch and unpack the inputs of the COCO dataset folder (the images only when `coco_images`)."""
    karpathy = fetch_param(downloads, "karpathy_split", extract=True, **download_kwargs)
    annotations = fetch_param(downloads, "coco_annotations", extract=True, **download_kwargs)
    images = {}
    if coco_images:
        for part in PARTS:
            folder = fetch_param(downloads, f"coco_{part}", extract=True, **download_kwargs)
            images[part] = _find(folder, part, f"coco_{part}").parent
    single_1k = None
    if any(url.strip() for url in downloads.vinvl_test_img_keys_1k.urls):
        single_1k = fetch_param(downloads, "vinvl_test_img_keys_1k", **download_kwargs)
    return Sources(
        karpathy=_find(karpathy, KARPATHY_FILE, "karpathy_split"),
        captions={p: _find(annotations, f"annotations/captions_{p}.json", "coco_annotations") for p in PARTS},
        instances={p: _find(annotations, f"annotations/instances_{p}.json", "coco_annotations") for p in PARTS},
        images=images,
        single_1k=single_1k,
    )


# ---------------------------------------------------------------------------------------------------
# COCO annotation files


def read_coco(path: Path, kind: str):
    """A COCO annotation file, checked and indexed by pycocotools. `kind`: captions | instances."""
    doc = read_json(path)
    images = _entries(doc, "images", path)
    annotations = _entries(doc, "annotations", path)
    image_ids = set()
    for i, image in enumerate(images):
        where = f"{path}: images[{i}]"
        image_id = _field(image, "id", int, where)
        _field(image, "file_name", str, where)
        if image_id in image_ids:
            raise PipelineError(f"{where}: image id {image_id} appears twice")
        image_ids.add(image_id)
    if kind == "instances":
        categories = {_field(c, "id", int, f"{path}: categories[{i}]")
                      for i, c in enumerate(_entries(doc, "categories", path))}
    ann_ids = set()
    for i, ann in enumerate(annotations):
        ann_id = _field(ann, "id", int, f"{path}: annotations[{i}]")
        where = f"{path}: annotation id {ann_id}"
        if ann_id in ann_ids:
            raise PipelineError(f"{where} appears twice")
        ann_ids.add(ann_id)
        if _field(ann, "image_id", int, where) not in image_ids:
            raise PipelineError(f"{where}: refers to unknown image id {ann['image_id']}")
        if kind == "captions":
            _field(ann, "caption", str, where)
        else:
            bbox = _field(ann, "bbox", list, where)
            if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
                raise PipelineError(f"{where}: 'bbox' must be [x, y, w, h] numbers, got {bbox!r}")
            if _field(ann, "category_id", int, where) not in categories:
                raise PipelineError(f"{where}: refers to unknown category id {ann['category_id']}")
    return coco_index(doc)


def coco_index(doc: dict):
    """pycocotools' index (`.imgs`, `.anns`, `.imgToAnns`, ...) of a COCO document already in memory."""
    from pycocotools.coco import COCO  # imported here: only the COCO source needs it

    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def merge_coco(parts: dict[str, object], paths: dict[str, Path]) -> dict:
    """One COCO document from the train2014 and val2014 ones: images and annotations concatenated in
    file order (train first); info, licenses and categories from train, which val must agree with."""
    first, *rest = PARTS
    merged = dict(parts[first].dataset)
    merged["images"], merged["annotations"] = [], []
    seen: dict[int, str] = {}
    for part in PARTS:
        doc = parts[part].dataset
        for image in doc["images"]:
            if image["id"] in seen:
                raise PipelineError(f"{paths[part]}: image id {image['id']} is also in {paths[seen[image['id']]]}")
            seen[image["id"]] = part
        merged["images"] += doc["images"]
        merged["annotations"] += doc["annotations"]
        if part != first and doc.get("categories") != merged.get("categories"):
            raise PipelineError(f"{paths[part]}: its categories differ from those of {paths[first]}")
    ann_ids = set()
    for ann in merged["annotations"]:
        if ann["id"] in ann_ids:
            raise PipelineError(f"{paths[first]} and {paths[rest[0]]}: annotation id {ann['id']} appears in both")
        ann_ids.add(ann["id"])
    return merged


# ---------------------------------------------------------------------------------------------------
# The dataset folder


def rewrite_karpathy(sources: Sources, captions) -> tuple[dict, dict[str, int]]:
    """The Karpathy document with `filepath` under images/, checked against the COCO captions; and counts."""
    path = sources.karpathy
    doc = read_json(path)
    entries = _entries(doc, "images", path)
    counts = {s: 0 for s in KARPATHY_SPLITS} | {"images": len(entries), "captions": 0}
    files = " or ".join(str(p) for p in sources.captions.values())
    seen = set()
    for i, entry in enumerate(entries):
        where = f"{path}: images[{i}]"
        split = _field(entry, "split", str, where)
        if split not in KARPATHY_SPLITS:
            raise PipelineError(f"{where}: split {split!r} is not one of {', '.join(KARPATHY_SPLITS)}")
        cocoid = _field(entry, "cocoid", int, where)
        folder, name = _field(entry, "filepath", str, where), _field(entry, "filename", str, where)
        if folder not in PARTS:
            raise PipelineError(f"{where}: filepath {folder!r} is not one of {', '.join(PARTS)}")
        if cocoid in seen:
            raise PipelineError(f"{where}: image cocoid {cocoid} is listed twice")
        seen.add(cocoid)
        if cocoid not in captions.imgs:
            raise PipelineError(f"{path}: image cocoid {cocoid} ({folder}/{name}) is not in the COCO captions "
                                f"({files})")
        if captions.imgs[cocoid]["file_name"] != name:
            raise PipelineError(f"{where}: cocoid {cocoid} is {name!r}, but the COCO captions name it "
                                f"{captions.imgs[cocoid]['file_name']!r}")
        entry["filepath"] = f"{IMAGES_DIR}/{folder}"
        counts[split] += 1
        counts["captions"] += len(_field(entry, "sentences", list, where))
    return doc, counts


def write_dataset_files(folder: Path, sources: Sources) -> dict[str, int]:
    """Write the dataset folder's files into the existing empty `folder`; returns counts."""
    parts = {p: read_coco(sources.captions[p], "captions") for p in PARTS}
    captions = merge_coco(parts, sources.captions)
    karpathy, counts = rewrite_karpathy(sources, coco_index(captions))
    keys = []
    if sources.single_1k is not None:  # checked before the images are linked
        keys = read_img_keys(sources.single_1k)
        try:
            key_rows(sources.single_1k, keys, [e["cocoid"] for e in karpathy["images"] if e["split"] == "test"],
                     split="Karpathy test")
        except PipelineError as e:
            raise PipelineError(f"{e} (downloads.vinvl_test_img_keys_1k; with urls: [] the vinvl_1k protocol is "
                                "reported absent instead)") from None
    counts["single_1k"] = len(keys)
    instances = merge_coco({p: read_coco(sources.instances[p], "instances") for p in PARTS}, sources.instances)
    counts["objects"] = len(instances["annotations"])
    counts["linked"] = 0
    (folder / "annotations").mkdir()
    if sources.images:
        for entry in karpathy["images"]:
            part = entry["filepath"].removeprefix(f"{IMAGES_DIR}/")
            src = sources.images[part] / part / entry["filename"]
            if not src.is_file():
                raise PipelineError(f"{src}: image of cocoid {entry['cocoid']} not found in the archive of "
                                    f"downloads.coco_{part}")
            link_or_copy(src, folder / entry["filepath"] / entry["filename"])
            counts["linked"] += 1
    (folder / KARPATHY_FILE).write_text(dumps_compact(karpathy))
    (folder / CAPTIONS_FILE).write_text(dumps_compact(captions))
    (folder / INSTANCES_FILE).write_text(dumps_compact(instances))
    if keys:
        (folder / SINGLE_1K_FILE).write_text("".join(f"{key}\n" for key in keys))
    return counts


def build_dataset(out_dir, downloads: DownloadsConfig, coco_images: bool, **download_kwargs) -> dict[str, int]:
    """Fetch the inputs and write the whole dataset folder `out_dir` atomically; returns counts."""
    sources = fetch_sources(downloads, coco_images, **download_kwargs)
    with atomic_path(out_dir, directory=True) as tmp:
        return write_dataset_files(tmp, sources)


def vocabulary(dataset_dir) -> list[str]:
    """Every word a caption or a tag can hold: the lower-cased tokens of the Karpathy sentences and the
    words of the COCO category names (the tags of features.mode given_boxes). For a random backbone."""
    path = Path(dataset_dir) / KARPATHY_FILE
    words = set()
    for i, entry in enumerate(_entries(read_json(path), "images", path)):
        for j, sentence in enumerate(_field(entry, "sentences", list, f"{path}: images[{i}]")):
            tokens = _field(sentence, "tokens", list, f"{path}: images[{i}].sentences[{j}]")
            words.update(t.lower() for t in tokens if isinstance(t, str))
    instances = Path(dataset_dir) / INSTANCES_FILE
    for i, cat in enumerate(_entries(read_json(instances), "categories", instances)):
        words.update(_field(cat, "name", str, f"{instances}: categories[{i}]").lower().split())
    return sorted(words)
