"""The dataset folder: writer determinism, COCO/Karpathy formats, readers, errors, and the data stage."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from aladin import data, synthetic, synthetic_data
from aladin.config import DataConfig
from aladin.io import PipelineError
from aladin.data import SINGLE_1K_FILE, read_img_keys
from stages import data as stage

TINY = DataConfig(n_train=8, n_val=3, n_test=4, image_size=64, single_1k_size=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "dataset"
    synthetic_data.write_dataset(out, TINY, seed=11)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_counts(dataset):
    files = _files(dataset)
    assert set(files) == {"dataset_coco.json", "annotations/captions.json", "annotations/instances.json",
                          SINGLE_1K_FILE, *(f"images/synthetic_{k:06d}.png" for k in range(15))}
    doc = json.loads(files["dataset_coco.json"])
    assert doc["dataset"] == "coco"
    splits = [im["split"] for im in doc["images"]]
    assert splits == ["train"] * 8 + ["val"] * 3 + ["test"] * 4
    sentids = [s["sentid"] for im in doc["images"] for s in im["sentences"]]
    assert sentids == list(range(75)) == [i for im in doc["images"] for i in im["sentids"]]
    for k, im in enumerate(doc["images"]):
        assert im["imgid"] == k and im["cocoid"] == k + 1 and im["filepath"] == "images"
        for s in im["sentences"]:
            assert s["imgid"] == k and s["tokens"] == s["raw"].removesuffix(".").split()


def test_rewrite_is_byte_identical_and_image_k_does_not_depend_on_the_size(dataset, tmp_path):
    again = tmp_path / "again"
    synthetic_data.write_dataset(again, TINY, seed=11)
    assert _files(again) == _files(dataset)
    smaller = tmp_path / "smaller"
    synthetic_data.write_dataset(smaller, DataConfig(n_train=3, n_val=1, n_test=2, image_size=64), seed=11)
    first = _files(dataset)
    for name, content in _files(smaller).items():
        if name.startswith("images/"):
            assert content == first[name], name  # same (seed, k), same bytes, whatever its split
    other = tmp_path / "other"
    synthetic_data.write_dataset(other, DataConfig(n_train=1, n_val=1, n_test=1, image_size=64), seed=12)
    assert _files(other)["images/synthetic_000000.png"] != first["images/synthetic_000000.png"]


def test_single_1k_key_file_is_a_seeded_test_subset_that_is_not_fold_0(dataset, tmp_path):
    keys = read_img_keys(dataset / SINGLE_1K_FILE)  # VinVL's coco_ir format, as evaluate reads it
    test_ids = [r.image_id for r in data.load_karpathy(dataset, "test")]  # 12..15
    assert len(keys) == 2 and keys == sorted(keys) and set(keys) <= set(test_ids)
    assert keys != test_ids[:2]  # the first fold of 2: the vinvl_1k and coco_1k_5fold protocols differ
    assert keys == [test_ids[int(r)] for r in synthetic_data.single_1k_rows(11, 4, 2)]
    # Its own random stream: another size changes the key file and nothing else, byte for byte.
    other = tmp_path / "other"
    synthetic_data.write_dataset(other, DataConfig(n_train=8, n_val=3, n_test=4, image_size=64,
                                                   single_1k_size=3), seed=11)
    first, second = _files(dataset), _files(other)
    assert len(read_img_keys(other / SINGLE_1K_FILE)) == 3
    assert {k: v for k, v in first.items() if k != SINGLE_1K_FILE} == \
        {k: v for k, v in second.items() if k != SINGLE_1K_FILE}


def test_single_1k_rows_draw():
    for seed in range(40):  # 1 of 3 images: without the redraw, a third of the seeds would give fold 0
        rows = synthetic_data.single_1k_rows(seed, 3, 1)
        assert rows.tolist() in ([1], [2])
        rows = synthetic_data.single_1k_rows(seed, 5, 2)
        assert rows.tolist() != [0, 1] and len(set(rows.tolist())) == 2 and rows.tolist() == sorted(rows.tolist())
    assert synthetic_data.single_1k_rows(0, 4, 4).tolist() == [0, 1, 2, 3]  # the whole split: nothing else to draw
    assert synthetic_data.single_1k_rows(0, 4, 9).tolist() == [0, 1, 2, 3]  # capped (params refuse it earlier)
    big = synthetic_data.single_1k_rows(0, 500, 100)
    assert big.dtype == np.int64 and len(np.unique(big)) == 100 and big.min() >= 0 and big.max() < 500
    assert big.tolist() == synthetic_data.single_1k_rows(0, 500, 100).tolist()
    assert big.tolist() != synthetic_data.single_1k_rows(1, 500, 100).tolist()
    with pytest.raises(PipelineError, match="data.single_1k_size must be positive"):
        synthetic_data.single_1k_rows(0, 4, 0)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_pycocotools_reads_captions_and_instances(dataset):
    caps = COCO(str(dataset / "annotations/captions.json"))
    assert len(caps.getImgIds()) == 15 and len(caps.getAnnIds()) == 75
    records = data.load_karpathy(dataset, "test")
    for r in records:
        anns = caps.loadAnns(caps.getAnnIds(imgIds=[r.image_id]))
        assert tuple(a["caption"] for a in anns) == r.captions
    inst = COCO(str(dataset / "annotations/instances.json"))
    assert [c["name"] for c in inst.loadCats(inst.getCatIds())] == list(synthetic.SHAPES)
    boxes = data.load_instances(dataset)
    assert sum(len(b) for b in boxes.values()) == len(inst.getAnnIds())
    for image_id, image_boxes in boxes.items():
        anns = inst.loadAnns(inst.getAnnIds(imgIds=[image_id]))
        assert 2 <= len(anns) == len(image_boxes) <= 4
        for a, b in zip(anns, image_boxes):
            x, y, w, h = a["bbox"]
            assert (b.x1, b.y1, b.x2, b.y2) == pytest.approx((x, y, x + w, y + h))
            assert b.category == inst.loadCats([a["category_id"]])[0]["name"]
            # The segmentation polygon rasterises to about the stated area (coarse at 64 px).
            assert inst.annToMask(a).sum() == pytest.approx(a["area"], rel=0.3, abs=6)


def test_instances_match_the_scene_and_the_pixels(dataset):
    boxes = data.load_instances(dataset)
    for r in data.load_karpathy(dataset, "val"):
        k = r.image_id - 1
        scene = synthetic.make_scene(11, k, TINY)
        assert [b.category for b in boxes[r.image_id]] == [o.shape for o in scene.objects]
        for b, o in zip(boxes[r.image_id], scene.objects):
            assert (b.x1, b.y1, b.x2, b.y2) == pytest.approx(o.bbox, abs=1e-6)
        pixels = np.asarray(data.load_image(dataset, r))  # (64, 64, 3)
        for o in scene.objects:
            x1, y1, x2, y2 = (int(v) for v in o.bbox)
            patch = pixels[y1:y2 + 1, x1:x2 + 1].reshape(-1, 3)
            assert (patch == synthetic.COLOURS[o.colour]).all(-1).mean() > 0.25


def test_karpathy_reader_round_trip(dataset):
    doc = json.loads((dataset / "dataset_coco.json").read_text())
    train = data.load_karpathy(dataset, "train")
    assert [r.image_id for r in train] == list(range(1, 9))
    assert train[2] == data.ImageRecord(3, "images/synthetic_000002.png",
                                        tuple(s["raw"] for s in doc["images"][2]["sentences"]))
    assert [r.image_id for r in data.load_karpathy(dataset, "val")] == [9, 10, 11]
    assert data.load_image(dataset, train[0]).size == (64, 64)


def _karpathy(tmp_path: Path, images: list[dict]) -> Path:
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    return tmp_path


def _entry(cocoid, split, n_captions=5, **extra):
    sentences = [{"raw": f"A caption {i} of {cocoid}. ", "tokens": [], "imgid": 0, "sentid": 0}
                 for i in range(n_captions)]
    return {"filepath": "val2014", "filename": f"COCO_{cocoid}.jpg", "imgid": 0, "split": split,
            "cocoid": cocoid, "sentences": sentences, **extra}


def test_karpathy_reader_handles_restval_and_coco_extras(tmp_path):
    folder = _karpathy(tmp_path, [_entry(42, "restval"), _entry(7, "train", n_captions=7), _entry(5, "test"),
                                  _entry(9, "val"), _entry(3, "restval")])
    train = data.load_karpathy(folder, "train")
    assert [r.image_id for r in train] == [42, 7, 3]  # restval joins train, file order kept
    assert train[0].file_name == "val2014/COCO_42.jpg"
    assert train[0].captions[0] == "A caption 0 of 42."  # raw text, whitespace stripped
    assert len(train[1].captions) == 7  # all kept; protocols take the first five
    assert [r.image_id for r in data.load_karpathy(folder, "test")] == [5]
    flickr = {k: v for k, v in _entry(0, "test").items() if k != "cocoid"} | {"imgid": 31}
    assert data.load_karpathy(_karpathy(tmp_path, [flickr]), "test")[0].image_id == 31


def test_karpathy_reader_errors(tmp_path):
    folder = _karpathy(tmp_path, [_entry(1, "train"), _entry(2, "test", n_captions=4)])
    with pytest.raises(PipelineError, match="image id 2 has 4 captions"):
        data.load_karpathy(folder, "test")
    with pytest.raises(PipelineError, match="split 'val' has no images"):
        data.load_karpathy(folder, "val")
    with pytest.raises(PipelineError, match=r"images\[0\]: missing key 'split'"):
        data.load_karpathy(_karpathy(tmp_path, [{"filename": "x.jpg"}]), "train")
    (tmp_path / "dataset_coco.json").write_text('{"images": [\n  {"split": "train",}\n]}')
    with pytest.raises(PipelineError, match=r"dataset_coco\.json:2: not valid JSON"):
        data.load_karpathy(tmp_path, "train")
    with pytest.raises(PipelineError, match=r"nothing[/\\]dataset_coco\.json: file not found"):
        data.load_karpathy(tmp_path / "nothing", "train")


def test_image_errors_name_the_path(dataset, tmp_path):
    record = data.ImageRecord(1, "images/missing.png", ("a",) * 5)
    with pytest.raises(PipelineError, match=r"images[/\\]missing\.png: image file not found"):
        data.load_image(dataset, record)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(PipelineError, match=r"broken\.png: cannot decode image"):
        data.load_image(tmp_path, data.ImageRecord(1, "broken.png", ("a",) * 5))


def _instances(tmp_path: Path, annotations: list[dict]) -> Path:
    (tmp_path / "annotations").mkdir(exist_ok=True)
    (tmp_path / "annotations/instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10},
                   {"id": 2, "file_name": "b.png", "width": 10, "height": 10}],
        "categories": [{"id": 4, "name": "star", "supercategory": "shape"}],
        "annotations": annotations}))
    return tmp_path


def test_instances_reader_and_errors(tmp_path):
    ann = {"id": 7, "image_id": 1, "category_id": 4, "bbox": [1.5, 2, 3, 4], "area": 12, "iscrowd": 0}
    assert data.load_instances(_instances(tmp_path, [ann])) == {1: [data.Box(1.5, 2.0, 4.5, 6.0, "star")], 2: []}
    with pytest.raises(PipelineError, match=r"instances\.json: annotation id 7: refers to unknown image id 3"):
        data.load_instances(_instances(tmp_path, [ann | {"image_id": 3}]))
    with pytest.raises(PipelineError, match="annotation id 7: refers to unknown category id 5"):
        data.load_instances(_instances(tmp_path, [ann | {"category_id": 5}]))
    with pytest.raises(PipelineError, match=r"annotation id 7: 'bbox' must be \[x, y, w, h\]"):
        data.load_instances(_instances(tmp_path, [ann | {"bbox": [1, 2, 3]}]))


# ---------------------------------------------------------------------------------------------------
# The stage


def _params(tmp_path: Path, data_section: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(f"seed: 3\ndata:\n{data_section}eval:\n  fold_size: 2\n")
    return path


SMALL = "  n_train: 4\n  n_val: 2\n  n_test: 2\n  image_size: 48\n  single_1k_size: 1\n"


def test_stage_writes_the_dataset_and_a_backbone_covering_every_caption(tmp_path, capsys):
    from aladin import backbone

    out, bb = tmp_path / "data" / "dataset", tmp_path / "data" / "backbone"
    assert stage.main(["--params", str(_params(tmp_path, SMALL)), "--out", str(out), "--backbone-out", str(bb)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "8 images (4 train, 2 val, 2 test), 40 captions" in summary[0]
    assert "objects, test_img_keys_1k.tsv (1 of the test images) in " in summary[0]
    assert read_img_keys(out / SINGLE_1K_FILE) == [8]  # image 1 of the test split, not fold 0's first
    tokenizer = backbone.load_tokenizer(bb)
    captions = [c for split in ("train", "val", "test") for r in data.load_karpathy(out, split) for c in r.captions]
    ids = tokenizer(captions + list(synthetic.SHAPES))["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["backbone", "dataset"]  # no temp leftovers


def test_stage_without_backbone(tmp_path, capsys):
    out = tmp_path / "dataset"
    assert stage.main(["--params", str(_params(tmp_path, SMALL)), "--out", str(out)]) == 0
    assert (out / "dataset_coco.json").is_file() and not (tmp_path / "backbone").exists()


@pytest.mark.parametrize("section, message", [
    ("  n_trian: 4\n", "unknown key 'data.n_trian'"),
    (SMALL + "  max_objects: 11\n", "data.max_objects = 11 is more than"),
    ("  image_size: 16\n", "data.image_size = 16 is too small"),
    (SMALL.replace("single_1k_size: 1", "single_1k_size: 3"), "data.single_1k_size (3) is larger than the test split (data.n_test = 2)"),
])
def test_stage_errors_are_one_line_and_leave_no_output(tmp_path, capsys, section, message):
    params = _params(tmp_path, section)
    out = tmp_path / "out" / "dataset"
    assert stage.main(["--params", str(params), "--out", str(out), "--backbone-out", str(tmp_path / "bb")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "bb").exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# Writing helpers


def test_link_or_copy_links_on_one_file_system_and_copies_across(tmp_path):
    import os
    import tempfile

    src = tmp_path / "src.bin"
    src.write_bytes(b"pixels")
    data.link_or_copy(src, tmp_path / "deep" / "er" / "dst.bin")
    assert (tmp_path / "deep/er/dst.bin").samefile(src) and src.stat().st_nlink == 2
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system to copy across")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        dst = Path(other) / "dst.bin"
        data.link_or_copy(src, dst)  # os.link fails with EXDEV: a copy
        assert dst.read_bytes() == b"pixels" and not dst.samefile(src)


def test_dumps_compact_is_sorted_and_unindented():
    assert data.dumps_compact({"b": [1, {"z": 0, "a": "é"}], "a": 2.5}) == '{"a":2.5,"b":[1,{"a":"\\u00e9","z":0}]}\n'
