"""A tiny MS-COCO 2014 world in the upstream file formats, and a loopback server for its downloads.

    world = write_coco_world(tmp_path / "upstream", n_train=20, n_restval=4, n_val=8, n_test=8)
    with loopback.serving() as server:
        downloads = serve(server, world["files"], tmp_path / "downloads")   # the params' downloads section

`write_coco_world` writes the archives as upstream ships them (formats: cs.stanford.edu/people/karpathy/
deepimagesent, cocodataset.org/#format-data):
    caption_datasets.zip            dataset_coco.json: {"dataset": "coco", "images": [{"filepath": "train2014" |
                                    "val2014", "filename", "imgid", "split": train | restval | val | test,
                                    "cocoid", "sentids", "sentences": [{"tokens", "raw", "imgid", "sentid"}]}]}
    annotations_trainval2014.zip    annotations/captions_{train,val}2014.json, instances_{train,val}2014.json
    train2014.zip, val2014.zip      train2014/COCO_train2014_%012d.jpg, val2014/COCO_val2014_%012d.jpg
    test_img_keys_1k.tsv            VinVL coco_ir's single 1K test set: one cocoid per line (here every other
                                    test image, from the last: not fold 0, and not in split order)
Karpathy's train images come from train2014; restval, val and test from val2014, as in the real split. The
pictures are the synthetic shapes world (aladin.synthetic) saved as JPEG: the instance boxes are the drawn
shapes and the captions are true of them ("a red square to the left of a blue circle"), so a tiny run can
learn something. One image has six captions, as some COCO images do. The same arguments give the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np

from aladin import synthetic
from aladin.config import DataConfig, DownloadsConfig
from aladin.download import catalogue_keys, file_name

from loopback import Route

ZIP_TIME = (2014, 9, 1, 0, 0, 0)  # fixed member timestamps: deterministic archive bytes
CATEGORY_IDS = (1, 2, 3, 5, 7, 8, 11)  # sparse, like COCO's 1..90 with gaps
COCO_FILES = ("karpathy_split", "coco_annotations", "coco_train2014", "coco_val2014", "vinvl_test_img_keys_1k")


def cocoid(k: int) -> int:
    return 1009 + 37 * k  # sparse, unordered with respect to the Karpathy file


def _zip(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """Members in order; data None is a folder entry. JSON deflated, JPEGs stored (as upstream)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            if data is None:
                info.external_attr = 0o40755 << 16 | 0x10
                zf.writestr(info, b"")
            else:
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED if name.endswith(".json") else zipfile.ZIP_STORED
                zf.writestr(info, data)
    return path


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def write_coco_world(root, n_train: int = 20, n_val: int = 8, n_test: int = 8, seed: int = 0, n_restval: int = 4,
                     image_size: int = 64) -> dict:
    """Write the four upstream archives and the 1K key file under `root`; returns

    {"files": {catalogue key: archive path}, "images": [{"cocoid", "split", "part", "file_name", "captions",
    "boxes": [(x1, y1, x2, y2, category name)]}] in Karpathy file order, "karpathy": the dataset_coco.json
    document, "categories": {name: id}, "single_1k": the key file's cocoids in file order}.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    splits = ["train"] * n_train + ["restval"] * n_restval + ["val"] * n_val + ["test"] * n_test
    categories = dict(zip(synthetic.SHAPES, CATEGORY_IDS))
    # Karpathy's file interleaves the splits; a seeded permutation does the same here.
    order = np.random.default_rng(seed).permutation(len(splits)).tolist()
    images, karpathy, jpegs = [], [], {"train2014": [], "val2014": []}
    coco = {part: {"images": [], "captions": [], "instances": []} for part in jpegs}
    sentid, caption_id, object_id = 0, 48, 900
    for imgid, k in enumerate(order):
        split = splits[k]
        part = "train2014" if split == "train" else "val2014"
        image_id = cocoid(k)
        name = f"COCO_{part}_{image_id:012d}.jpg"
        n_captions = 6 if imgid == 0 else 5
        example = synthetic.generate(seed, k, DataConfig(image_size=image_size, captions_per_image=n_captions))
        buffer = io.BytesIO()
        example.image.save(buffer, format="JPEG", quality=92)
        jpegs[part].append((f"{part}/{name}", buffer.getvalue()))
        raws = [c[0].upper() + c[1:] + (" " if i % 2 else "") for i, c in enumerate(example.captions)]
        sentences = []
        for raw in raws:
            sentences.append({"tokens": re.findall(r"[a-z0-9]+", raw.lower()), "raw": raw, "imgid": imgid,
                              "sentid": sentid})
            coco[part]["captions"].append({"image_id": image_id, "id": caption_id, "caption": raw})
            sentid += 1
            caption_id += 3
        karpathy.append({"filepath": part, "sentids": [s["sentid"] for s in sentences], "filename": name,
                         "imgid": imgid, "split": split, "sentences": sentences, "cocoid": image_id})
        coco[part]["images"].append({
            "license": 1, "file_name": name, "coco_url": f"http://images.cocodataset.org/{part}/{name}",
            "height": image_size, "width": image_size, "date_captured": "2013-11-14 16:28:13",
            "flickr_url": f"http://farm1.staticflickr.com/1/{image_id}_z.jpg", "id": image_id})
        boxes = []
        for obj in example.scene.objects:
            x1, y1, x2, y2 = obj.bbox
            coco[part]["instances"].append({
                "segmentation": [[round(v, 2) for p in synthetic.outline(obj) for v in p]],
                "area": round(synthetic.area(obj), 2), "iscrowd": 0, "image_id": image_id,
                "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], "category_id": categories[obj.shape],
                "id": object_id})
            object_id += 5
            boxes.append((x1, y1, x2, y2, obj.shape))
        images.append({"cocoid": image_id, "split": split, "part": part, "file_name": name,
                       "captions": [r.strip() for r in raws], "boxes": boxes})
    info = {"description": "COCO 2014 Dataset (test fixture)", "url": "http://cocodataset.org", "version": "1.0",
            "year": 2014, "contributor": "COCO Consortium", "date_created": "2017/09/01"}
    licenses = [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
                 "name": "Attribution-NonCommercial-ShareAlike License"}]
    cats = [{"supercategory": "shape", "id": i, "name": n} for n, i in categories.items()]
    doc = {"images": karpathy, "dataset": "coco"}
    annotations = [("annotations/", None)]
    for part in jpegs:
        annotations.append((f"annotations/captions_{part}.json", _json(
            {"info": info, "images": coco[part]["images"], "licenses": licenses,
             "annotations": coco[part]["captions"]})))
        annotations.append((f"annotations/instances_{part}.json", _json(
            {"info": info, "images": coco[part]["images"], "licenses": licenses,
             "annotations": coco[part]["instances"], "categories": cats})))
    test_ids = [i["cocoid"] for i in images if i["split"] == "test"]
    single_1k = test_ids[1::2][::-1]
    (root / "test_img_keys_1k.tsv").write_text("".join(f"{i}\n" for i in single_1k))
    files = {
        "karpathy_split": _zip(root / "caption_datasets.zip", [("dataset_coco.json", _json(doc))]),
        "coco_annotations": _zip(root / "annotations_trainval2014.zip", annotations),
        "coco_train2014": _zip(root / "train2014.zip", [("train2014/", None)] + sorted(jpegs["train2014"])),
        "coco_val2014": _zip(root / "val2014.zip", [("val2014/", None)] + sorted(jpegs["val2014"])),
        "vinvl_test_img_keys_1k": root / "test_img_keys_1k.tsv",
    }
    return {"files": files, "images": images, "karpathy": doc, "categories": categories, "single_1k": single_1k}


def checkpoint_files(folder, init: str = "vinvl") -> dict[str, Path]:
    """Catalogue keys -> the files of a backbone folder (config.json, vocab.txt, weights) to serve."""
    folder = Path(folder)
    prefix = "vinvl_backbone" if init == "vinvl" else "bert"
    weights = next(folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file())
    return {f"{prefix}_config": folder / "config.json", f"{prefix}_vocab": folder / "vocab.txt",
            f"{prefix}_weights": weights}


def serve(server, files: dict[str, Path | bytes], download_dir, allow_unverified: bool = False) -> dict:
    """Route each file on the loopback `server` and return a params `downloads` section for it.

    Every catalogue entry points at 127.0.0.1: those in `files` (catalogue key -> file or bytes) are served
    under the catalogue's file name with their true sha256 and size; the others name a loopback URL that
    answers 404 and stay unpinned, so that no test can reach the real mirrors.
    """
    defaults = DownloadsConfig()
    section = {"dir": str(download_dir), "allow_unverified": allow_unverified, "retries": 2, "timeout": 10.0}
    for key in catalogue_keys(defaults):
        name = file_name(getattr(defaults, key), key)
        if key not in files:
            section[key] = {"urls": [server.url(f"/absent/{key}/{name}")], "sha256": "", "size": 0}
            continue
        data = files[key] if isinstance(files[key], bytes) else Path(files[key]).read_bytes()
        route = f"/{key}/{name}"
        server.routes[route] = Route(data=data)
        section[key] = {"urls": [server.url(route)], "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return section
