"""BUTD-36 region features in TERAN's per-image layout, and conversion to and from the VinVL layout.

TERAN (PEERS.md 3.1) reads bottom-up-attention features made by SGAE's `make_bu_data.py`, one file pair per image:

    bu_att/<image_id>.npz    key `feat`, float32 [36, D]   (D = 2048 for BUTD)
    bu_box/<image_id>.npy    float32 [36, 4]               pixel boxes x1, y1, x2, y2 of the original image
    sizes.json               {image_id: [W, H]}            written here; TERAN takes sizes from the COCO JSON
    counts.json              {image_id: real regions}      written here; absent in TERAN's own folders

Every other stage of this pipeline reads the VinVL layout (ALADIN.md 6.3-6.4): `features.tsv` rows
`image_id \\t num_boxes \\t base64(float32 [num_boxes, D + 6])`, the 6 = x1/W, y1/H, x2/W, y2/H, w/W, h/H.

BUTD always has exactly 36 slots. An image with fewer regions gets zero features and zero boxes in the
remaining slots and its real count in `counts.json`, so a reader can mask them; an image with more keeps
its first 36 (the detector writes regions by descending score). A folder without `counts.json` (TERAN's
originals) has all 36 slots real.

Bringing BUTD-36 features (e.g. TERAN's released `bu_att`/`bu_box` folders) to every stage:

    python -m aladin.butd --to-vinvl BUTD_DIR --dataset data/dataset --out data/features_butd

writes `features.tsv`, `features.lineidx`, `predictions.tsv`, `predictions.lineidx` and `imageid2idx.json`
for the images of the dataset's train, val and test splits, in that order (the features stage's order).
Image sizes come from `BUTD_DIR/sizes.json` where it has them, else from the dataset's
`annotations/instances.json` (or `captions.json`) `images` entries. Without `--dataset`, every image of
`sizes.json` is converted. BUTD has no object classes, so `predictions.tsv` lists no objects: ALADIN then
sees no tags (TERAN and SelfAlign do not use tags). params `model.img_feature_dim` must be D + 6 (2054).

The other direction, for TERAN-format tools: `python -m aladin.butd --features data/features --dataset
data/dataset --out data/butd`.
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .data import CAPTIONS_FILE, INSTANCES_FILE, load_karpathy
from .features import BOX_DIMS, SPLITS, ImageRegions, box_vectors, write_region_files
from .io import PipelineError, atomic_path, error_message, read_json, write_json
from .regions import RegionFeatures

NUM_REGIONS = 36  # BUTD's fixed slot count (Anderson et al.; TERAN's features)
ATT_DIR, BOX_DIR = "bu_att", "bu_box"
SIZES_FILE, COUNTS_FILE = "sizes.json", "counts.json"
BOX_TOLERANCE = 1.0  # pixels a box may pass the image edge: COCO boxes overshoot by fractions of a pixel
GEOMETRY_TOLERANCE = 1e-4  # |w/W - (x2/W - x1/W)| allowed in a VinVL row (float32 rounding is ~1e-7)


# ---------------------------------------------------------------------------------------------------
# Image sizes


def image_sizes(dataset_dir: str | Path) -> tuple[dict[int, tuple[int, int]], Path]:
    """{image id: (W, H)} from the `images` entries of the dataset's COCO JSON, and the file read.

    `annotations/instances.json` first (both profiles write width/height there), else `captions.json`.
    """
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / INSTANCES_FILE
    if not path.is_file() and (dataset_dir / CAPTIONS_FILE).is_file():
        path = dataset_dir / CAPTIONS_FILE
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise PipelineError(f"{path}: expected a JSON object with an 'images' list")
    sizes = {}
    for i, entry in enumerate(doc["images"]):
        values = [entry.get(k) if isinstance(entry, dict) else None for k in ("id", "width", "height")]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values) or min(values[1:]) <= 0:
            raise PipelineError(f"{path}: images[{i}] needs an integer 'id' and positive integer 'width' "
                                f"and 'height'")
        sizes[values[0]] = (values[1], values[2])
    return sizes, path


def _read_size_file(path: Path) -> dict[int, tuple[int, int]]:
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise PipelineError(f"{path}: expected an object {{image id: [W, H]}}")
    sizes = {}
    for key, value in doc.items():
        ok = isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        if not ok or not key.lstrip("-").isdigit():
            raise PipelineError(f"{path}: entry {key!r}: {value!r} is not an image id with [W, H] positive integers")
        sizes[int(key)] = (value[0], value[1])
    return sizes


# ---------------------------------------------------------------------------------------------------
# Region arithmetic


def vinvl_to_butd(regions: np.ndarray, size: tuple[int, int], num_regions: int = NUM_REGIONS,
                  where: str = "regions") -> tuple[np.ndarray, np.ndarray, int]:
    """VinVL rows (N, D + 6) of an image of `size` (W, H) -> (feat [R, D], boxes_px [R, 4], count), R = num_regions.

    Pixel boxes = the normalized corners x (W, H, W, H). Rows past R are dropped, missing ones are zeros.
    The geometry is checked (its widths agree with its corners, the box lies in the image), so features
    of another layout fail here naming `where`, not later in a reader.
    """
    W, H = size
    count = min(len(regions), num_regions)
    geometry = regions[:count, -BOX_DIMS:].astype(np.float64)  # (count, 6)
    sizes = geometry[:, 2:4] - geometry[:, 0:2]  # (count, 2) from the corners
    off = np.abs(sizes - geometry[:, 4:6])
    if off.size and off.max() > GEOMETRY_TOLERANCE:
        r = int(np.argwhere(off > GEOMETRY_TOLERANCE)[0][0])
        raise PipelineError(f"{where}: region {r}: the last 6 values {geometry[r].tolist()} are not VinVL box "
                            f"geometry (x1/W, y1/H, x2/W, y2/H, w/W, h/H): w/W, h/H disagree with the corners")
    feat = np.zeros((num_regions, regions.shape[1] - BOX_DIMS), dtype=np.float32)  # (R, D)
    boxes = np.zeros((num_regions, 4), dtype=np.float32)  # (R, 4)
    feat[:count] = regions[:count, :-BOX_DIMS]
    boxes[:count] = geometry[:, :4] * np.array([W, H, W, H], dtype=np.float64)
    _check_boxes(boxes[:count], size, where)
    return feat, boxes, count


def butd_to_vinvl_regions(feat: np.ndarray, boxes_px: np.ndarray, size: tuple[int, int], count: int) -> np.ndarray:
    """The first `count` BUTD slots as the pipeline's region rows: float32 [count, D + 6], the feature, then
    x1/W, y1/H, x2/W, y2/H, w/W, h/H (the features stage's own `box_vectors`, so both agree bit for bit)."""
    W, H = size
    return np.concatenate([feat[:count].astype(np.float32), box_vectors(boxes_px[:count], W, H)], axis=1)


def _check_boxes(boxes: np.ndarray, size: tuple[int, int], where: str) -> None:
    W, H = size
    t = BOX_TOLERANCE
    bad = ((boxes[:, 0] < -t) | (boxes[:, 1] < -t) | (boxes[:, 2] > W + t) | (boxes[:, 3] > H + t)
           | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise PipelineError(f"{where}: region {r}: box {boxes[r].tolist()} (x1, y1, x2, y2) is not inside the "
                            f"{W}x{H} image")


# ---------------------------------------------------------------------------------------------------
# Writing and reading the BUTD layout


def write_butd(features: RegionFeatures, dataset_dir: str | Path, out_dir: str | Path,
               num_regions: int = NUM_REGIONS) -> int:
    """Every image of a VinVL feature folder into TERAN's layout at `out_dir`; returns the image count.

    Sizes come from the dataset's COCO JSON (`image_sizes`). The folder appears whole or not at all.
    """
    if len(features) == 0:
        raise PipelineError(f"{features.index_path}: no images to convert")
    if features.dim <= BOX_DIMS:
        raise PipelineError(f"{features.features.path}: {features.dim} values per region, expected D + 6 > 6")
    sizes, sizes_path = image_sizes(dataset_dir)
    out_sizes, counts = {}, {}
    with atomic_path(out_dir, directory=True) as tmp:
        (tmp / ATT_DIR).mkdir()
        (tmp / BOX_DIR).mkdir()
        for image_id in features.image_ids:
            if image_id not in sizes:
                raise PipelineError(f"{sizes_path}: no width/height for image id {image_id} of "
                                    f"{features.features.path}")
            regions, _ = features[image_id]  # (N, D + 6)
            where = f"{features.features.path}:{features.index[str(image_id)] + 1}"
            feat, boxes, count = vinvl_to_butd(regions, sizes[image_id], num_regions, where)
            np.savez_compressed(tmp / ATT_DIR / f"{image_id}.npz", feat=feat)  # as make_bu_data.py
            np.save(tmp / BOX_DIR / f"{image_id}.npy", boxes)
            out_sizes[str(image_id)] = list(sizes[image_id])
            counts[str(image_id)] = count
        write_json(tmp / SIZES_FILE, out_sizes)
        write_json(tmp / COUNTS_FILE, counts)
    return len(counts)


class BUTDFolder:
    """A BUTD folder with `sizes.json` and `counts.json` read once.

    `folder.read(image_id)` -> (feat [R, D] float32, boxes_px [R, 4] float32, (W, H), count). Sizes come
    from `sizes.json`, else from `sizes` (e.g. `image_sizes` of a dataset). `num_regions=None` accepts
    any R. Every malformed input raises a `PipelineError` naming its file.
    """

    def __init__(self, folder: str | Path, num_regions: int | None = NUM_REGIONS,
                 sizes: dict[int, tuple[int, int]] | None = None):
        self.folder = Path(folder)
        self.num_regions = num_regions
        self.sizes_path = self.folder / SIZES_FILE
        self.counts_path = self.folder / COUNTS_FILE
        if not (self.folder / ATT_DIR).is_dir():
            raise PipelineError(f"{self.folder / ATT_DIR}: folder not found (not a BUTD feature folder)")
        self.sizes = dict(sizes or {})
        self.has_size_file = self.sizes_path.is_file()
        if self.has_size_file:
            self.sizes.update(_read_size_file(self.sizes_path))
        self.counts = None
        if self.counts_path.is_file():
            doc = read_json(self.counts_path)
            if not isinstance(doc, dict):
                raise PipelineError(f"{self.counts_path}: expected an object {{image id: region count}}")
            self.counts = doc

    def size(self, image_id: int) -> tuple[int, int]:
        if image_id not in self.sizes:
            where = self.sizes_path if self.has_size_file else f"{self.sizes_path} (absent) or the dataset"
            raise PipelineError(f"{where}: no [W, H] for image id {image_id}")
        return self.sizes[image_id]

    def read(self, image_id: int):
        att = self.folder / ATT_DIR / f"{image_id}.npz"
        box = self.folder / BOX_DIR / f"{image_id}.npy"
        feat = _load(att, "feat")  # (R, D)
        if feat.ndim != 2 or (self.num_regions is not None and feat.shape[0] != self.num_regions):
            want = f"[{self.num_regions}, D]" if self.num_regions is not None else "[R, D]"
            raise PipelineError(f"{att}: 'feat' has shape {list(feat.shape)}, expected {want}")
        boxes = _load(box, None)  # (R, 4)
        if boxes.shape != (feat.shape[0], 4):
            raise PipelineError(f"{box}: shape {list(boxes.shape)}, expected [{feat.shape[0]}, 4] "
                                f"(one pixel box x1, y1, x2, y2 per row of {att.name})")
        size = self.size(image_id)
        count = feat.shape[0]
        if self.counts is not None:
            count = self.counts.get(str(image_id))
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= feat.shape[0]:
                raise PipelineError(f"{self.counts_path}: image id {image_id}: count {count!r} is not an "
                                    f"integer in 1..{feat.shape[0]}")
        _check_boxes(boxes[:count], size, str(box))
        return feat, boxes, size, count


def _load(path: Path, key: str | None) -> np.ndarray:
    """One float array from `path` (.npz by `key`, or .npy), finite and as float32."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if key is None:
            array = loaded
        elif not isinstance(loaded, np.lib.npyio.NpzFile):
            raise PipelineError(f"{path}: not a .npz archive (a bare array); expected key '{key}'")
        else:
            with loaded:
                if key not in loaded.files:
                    raise PipelineError(f"{path}: no array '{key}' (has {sorted(loaded.files)})")
                array = loaded[key]
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise PipelineError(f"{path}: cannot read ({e})") from None
    if not isinstance(array, np.ndarray) or not (np.issubdtype(array.dtype, np.floating)
                                                 or np.issubdtype(array.dtype, np.integer)):
        raise PipelineError(f"{path}: expected a numeric array, got {getattr(array, 'dtype', type(array).__name__)}")
    array = array.astype(np.float32)
    bad = np.argwhere(~np.isfinite(array))
    if len(bad):  # one NaN region turns every loss of its batches into NaN, far from the cause
        raise PipelineError(f"{path}: value at {bad[0].tolist()} is {array[tuple(bad[0])]}; must be finite "
                            f"({len(bad)} non-finite values)")
    return array


def read_butd(folder: str | Path, image_id: int, num_regions: int | None = NUM_REGIONS):
    """One image of a BUTD folder: (feat [36, D], boxes_px [36, 4], (W, H), count). See `BUTDFolder`."""
    return BUTDFolder(folder, num_regions).read(image_id)


# ---------------------------------------------------------------------------------------------------
# BUTD -> VinVL


def write_vinvl(butd_dir: str | Path, out_dir: str | Path, dataset_dir: str | Path | None = None,
                num_regions: int | None = NUM_REGIONS) -> int:
    """A BUTD folder as a VinVL feature folder at `out_dir` (features.tsv, predictions.tsv, their .lineidx,
    imageid2idx.json); returns the image count. Images: the dataset's train, val, test splits in that order
    when `dataset_dir` is given, else every image of sizes.json by id. The folder appears whole or not at all.
    """
    sizes = image_sizes(dataset_dir)[0] if dataset_dir is not None else None
    folder = BUTDFolder(butd_dir, num_regions, sizes)
    if dataset_dir is not None:
        image_ids = [r.image_id for split in SPLITS for r in load_karpathy(dataset_dir, split)]
    elif folder.has_size_file:
        image_ids = sorted(_read_size_file(folder.sizes_path))
    else:
        raise PipelineError(f"{folder.sizes_path}: file not found; pass --dataset to name the images and "
                            f"their sizes")
    if not image_ids:
        raise PipelineError(f"{folder.sizes_path}: no images to convert")

    def items() -> Iterator[ImageRegions]:
        dim = None
        for image_id in image_ids:
            feat, boxes, (W, H), count = folder.read(image_id)
            if dim is not None and feat.shape[1] != dim:
                raise PipelineError(f"{folder.folder / ATT_DIR / f'{image_id}.npz'}: D = {feat.shape[1]}, but "
                                    f"earlier images have D = {dim}")
            dim = feat.shape[1]
            # BUTD has no classes: no objects, so no tags (zip in region_rows pairs boxes with classes).
            yield ImageRegions(image_id, W, H, [tuple(map(float, b)) for b in boxes[:count]], [], [],
                               feat[:count])

    with atomic_path(out_dir, directory=True) as tmp:
        return write_region_files(tmp, items())


# ---------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aladin.butd", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", help="VinVL feature folder to write as BUTD (needs --dataset)")
    source.add_argument("--to-vinvl", metavar="BUTD_DIR", help="BUTD folder to write as a VinVL feature folder")
    parser.add_argument("--dataset", help="dataset folder: image sizes (and, with --to-vinvl, the images)")
    parser.add_argument("--out", required=True, help="output folder, replaced as a whole")
    parser.add_argument("--num-regions", type=int, default=NUM_REGIONS, help="BUTD slots per image (36)")
    args = parser.parse_args(argv)
    try:
        if args.features is not None:
            if args.dataset is None:
                raise PipelineError("--features needs --dataset (the image sizes)")
            n = write_butd(RegionFeatures(args.features), args.dataset, args.out, args.num_regions)
        else:
            n = write_vinvl(args.to_vinvl, args.out, args.dataset, args.num_regions)
    except PipelineError as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 1
    print(f"{n} images -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
