"""data.source coco: the dataset folder built by the data stage from upstream-format archives served on loopback."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from coco_fixture import serve, write_coco_world
from loopback import server  # noqa: F401  (a fixture)
from PIL import Image

from aladin import coco, data
from aladin.data import SINGLE_1K_FILE, read_img_keys
from stages import data as stage

N = dict(n_train=6, n_restval=2, n_val=3, n_test=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_coco_world(tmp_path_factory.mktemp("upstream"), seed=5, **N)


def _params(tmp_path: Path, downloads: dict, **sections) -> Path:
    raw = {"seed": 0, "data": {"source": "coco"}, "downloads": downloads, "eval": {"fold_size": 3}} | sections
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(params: Path, out: Path, backbone: Path | None = None) -> int:
    argv = ["--params", str(params), "--out", str(out)]
    return stage.main(argv + (["--backbone-out", str(backbone)] if backbone else []))


def test_coco_dataset_through_the_stage(world, server, tmp_path, capsys):  # noqa: F811
    params = _params(tmp_path, serve(server, world["files"], tmp_path / "dl"))
    out, bb = tmp_path / "data" / "dataset", tmp_path / "data" / "backbone"
    assert _run(params, out, bb) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert summary == [f"data: 14 COCO images (8 train incl. 2 restval, 3 val, 3 test), 71 captions, "
                       f"{sum(len(i['boxes']) for i in world['images'])} objects, 14 images linked, "
                       f"test_img_keys_1k.tsv (1 of the test images) in {out}; "
                       f"backbone (random 2-layer BERT (hidden 64)) in {bb}"]
    # VinVL's 1K key file, checked against the Karpathy test split, its ids in file order
    test_ids = [i["cocoid"] for i in world["images"] if i["split"] == "test"]
    assert read_img_keys(out / SINGLE_1K_FILE) == world["single_1k"] == [test_ids[1]]

    # Splits in Karpathy file order, restval in train; the raw captions, stripped.
    for split, wanted in (("train", ("train", "restval")), ("val", ("val",)), ("test", ("test",))):
        expected = [i for i in world["images"] if i["split"] in wanted]
        records = data.load_karpathy(out, split)
        assert [r.image_id for r in records] == [i["cocoid"] for i in expected]
        assert [list(r.captions) for r in records] == [i["captions"] for i in expected]
        assert [r.file_name for r in records] == [f"images/{i['part']}/{i['file_name']}" for i in expected]
    assert len(world["images"][0]["captions"]) == 6  # ... so the image with six captions kept them all

    # Images: hard links to the extracted archive members, decodable, the drawn shapes where the boxes say.
    boxes = data.load_instances(out)
    for image in world["images"]:
        linked = out / "images" / image["part"] / image["file_name"]
        extracted = tmp_path / "dl" / image["part"] / image["part"] / image["file_name"]
        assert linked.samefile(extracted)
        with zipfile.ZipFile(world["files"][f"coco_{image['part']}"]) as zf:
            assert linked.read_bytes() == zf.read(f"{image['part']}/{image['file_name']}")
        record = data.ImageRecord(image["cocoid"], f"images/{image['part']}/{image['file_name']}", ())
        assert data.load_image(out, record).size == (64, 64)
        # Instances of train2014 and val2014 merged: every image has its own boxes, names resolved.
        got = boxes[image["cocoid"]]
        assert [b.category for b in got] == [name for *_, name in image["boxes"]]
        assert [v for b in got for v in (b.x1, b.y1, b.x2, b.y2)] == \
            pytest.approx([v for box in image["boxes"] for v in box[:4]], abs=0.011)  # w, h rounded to 0.01


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_merged_annotations_read_by_pycocotools(world, server, tmp_path):  # noqa: F811
    from pycocotools.coco import COCO

    params = _params(tmp_path, serve(server, world["files"], tmp_path / "dl"), data={"source": "coco",
                                                                                    "coco_images": False})
    out = tmp_path / "dataset"
    assert _run(params, out) == 0
    caps = COCO(str(out / "annotations/captions.json"))
    assert sorted(caps.getImgIds()) == sorted(i["cocoid"] for i in world["images"])
    for image in world["images"]:
        anns = caps.loadAnns(caps.getAnnIds(imgIds=[image["cocoid"]]))
        assert [a["caption"].strip() for a in anns] == image["captions"]
        assert caps.loadImgs([image["cocoid"]])[0]["file_name"] == image["file_name"]
    inst = COCO(str(out / "annotations/instances.json"))
    assert {c["name"]: c["id"] for c in inst.loadCats(inst.getCatIds())} == world["categories"]
    assert len(inst.getAnnIds()) == sum(len(i["boxes"]) for i in world["images"])
    # No images asked for: none fetched, none linked; the captions and splits are all there.
    assert not (out / "images").exists()
    assert not any(path.startswith(("/coco_train2014/", "/coco_val2014/")) for path, _ in server.log.requests)
    assert len(data.load_karpathy(out, "test")) == 3


def test_rebuild_is_byte_identical_and_fetches_nothing(world, server, tmp_path):  # noqa: F811
    params = _params(tmp_path, serve(server, world["files"], tmp_path / "dl"))
    assert _run(params, tmp_path / "a", tmp_path / "bb_a") == 0
    requests = len(server.log.requests)
    assert _run(params, tmp_path / "b", tmp_path / "bb_b") == 0
    assert len(server.log.requests) == requests  # archives verified in downloads.dir, extracted folders reused
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "bb_a") == _files(tmp_path / "bb_b")


def test_random_backbone_covers_the_karpathy_tokens_and_category_names(world, server, tmp_path):  # noqa: F811
    from aladin import backbone

    params = _params(tmp_path, serve(server, world["files"], tmp_path / "dl"), data={"source": "coco",
                                                                                    "coco_images": False})
    assert _run(params, tmp_path / "dataset", tmp_path / "bb") == 0
    vocab = (tmp_path / "bb" / "vocab.txt").read_text().split("\n")
    tokens = {t for s in world["karpathy"]["images"] for sent in s["sentences"] for t in sent["tokens"]}
    assert tokens | set(world["categories"]) <= set(vocab) and vocab[100] == "[UNK]"
    assert coco.vocabulary(tmp_path / "dataset") == sorted(tokens | set(world["categories"]))
    tokenizer = backbone.load_tokenizer(tmp_path / "bb")
    ids = tokenizer([c for i in world["images"] for c in i["captions"]])["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)


def _rezip(src: Path, dst: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info)))
    return dst


def _assert_failed_cleanly(capsys, tmp_path, out, bb, *parts):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)
    assert not out.exists() and not bb.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    return err


def test_karpathy_image_missing_from_coco_is_named_and_nothing_written(world, server, tmp_path, capsys):  # noqa: F811
    victim = world["images"][4]

    def drop_image(name, payload):
        if not name.endswith(f"captions_{victim['part']}.json"):
            return payload
        doc = json.loads(payload)
        doc["images"] = [i for i in doc["images"] if i["id"] != victim["cocoid"]]
        doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != victim["cocoid"]]
        return json.dumps(doc).encode()

    files = dict(world["files"], coco_annotations=_rezip(world["files"]["coco_annotations"],
                                                        tmp_path / "annotations_trainval2014.zip", drop_image))
    params = _params(tmp_path, serve(server, files, tmp_path / "dl"))
    out, bb = tmp_path / "out" / "dataset", tmp_path / "out" / "backbone"
    (tmp_path / "out").mkdir()
    assert _run(params, out, bb) == 1
    annotations = tmp_path / "dl" / "annotations_trainval2014" / "annotations"
    _assert_failed_cleanly(capsys, tmp_path, out, bb, f"image cocoid {victim['cocoid']}",
                           f"{victim['part']}/{victim['file_name']}", "dataset_coco.json",
                           str(annotations / "captions_train2014.json"), str(annotations / "captions_val2014.json"))


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_archive_is_named_and_nothing_written(world, server, tmp_path, capsys, damage):  # noqa: F811
    good = world["files"]["coco_annotations"].read_bytes()
    if damage == "truncated":
        bad = good[: len(good) * 2 // 3]
    else:  # one flipped byte inside a deflated member: the CRC (or the inflater) catches it
        bad = bytearray(good)
        bad[200] ^= 0xFF
        bad = bytes(bad)
    params = _params(tmp_path, serve(server, dict(world["files"], coco_annotations=bad), tmp_path / "dl"))
    out, bb = tmp_path / "out" / "dataset", tmp_path / "out" / "backbone"
    (tmp_path / "out").mkdir()
    assert _run(params, out, bb) == 1
    err = _assert_failed_cleanly(capsys, tmp_path, out, bb, "downloads.coco_annotations",
                                 str(tmp_path / "dl" / "annotations_trainval2014.zip"), "delete")
    assert ("neither a zip nor a tar" in err) if damage == "truncated" else ("cannot extract" in err)
    assert not (tmp_path / "dl" / "annotations_trainval2014").exists()


def test_unpinned_download_is_refused_by_default(world, server, tmp_path, capsys):  # noqa: F811
    downloads = serve(server, world["files"], tmp_path / "dl")
    downloads["karpathy_split"]["sha256"] = ""
    out = tmp_path / "dataset"
    assert _run(_params(tmp_path, downloads), out) == 1
    err = capsys.readouterr().err
    assert "downloads.karpathy_split (caption_datasets.zip): no sha256 is pinned" in err and not out.exists()
    assert server.log.requests == []
    downloads["allow_unverified"] = True
    assert _run(_params(tmp_path, downloads), out) == 0
    assert "warning: downloads.karpathy_split:" in capsys.readouterr().err


def test_a_1k_key_outside_the_test_split_is_named_with_its_line(world, server, tmp_path, capsys):  # noqa: F811
    test_ids = [i["cocoid"] for i in world["images"] if i["split"] == "test"]
    val_id = next(i["cocoid"] for i in world["images"] if i["split"] == "val")
    keys = f"{test_ids[0]}\n{test_ids[2]}\n{val_id}\n".encode()
    params = _params(tmp_path, serve(server, dict(world["files"], vinvl_test_img_keys_1k=keys), tmp_path / "dl"))
    out, bb = tmp_path / "out" / "dataset", tmp_path / "out" / "backbone"
    (tmp_path / "out").mkdir()
    assert _run(params, out, bb) == 1
    _assert_failed_cleanly(capsys, tmp_path, out, bb, f"{tmp_path / 'dl' / SINGLE_1K_FILE}:3: image id {val_id} "
                           "is not an image of the Karpathy test split")


def test_without_a_1k_key_url_nothing_is_fetched_and_no_key_file_written(world, server, tmp_path, capsys):  # noqa: F811
    downloads = serve(server, world["files"], tmp_path / "dl")
    downloads["vinvl_test_img_keys_1k"]["urls"] = []  # a user without access to VinVL's coco_ir blob
    params = _params(tmp_path, downloads, data={"source": "coco", "coco_images": False})
    assert _run(params, tmp_path / "dataset") == 0
    assert "no test_img_keys_1k.tsv (downloads.vinvl_test_img_keys_1k has no URL)" in capsys.readouterr().out
    assert not (tmp_path / "dataset" / SINGLE_1K_FILE).exists()
    assert not any("vinvl_test_img_keys_1k" in path for path, _ in server.log.requests)


def test_fixture_images_show_their_boxes(world):
    # The pictures are worth learning from: each box holds its shape's colour (the drawn object).
    with zipfile.ZipFile(world["files"]["coco_val2014"]) as zf:
        image = next(i for i in world["images"] if i["part"] == "val2014")
        pixels = np.asarray(Image.open(io.BytesIO(zf.read(f"val2014/{image['file_name']}"))).convert("RGB"))
    assert pixels.shape == (64, 64, 3)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    for x1, y1, x2, y2, _ in image["boxes"]:
        patch = pixels[int(y1) + 1:int(y2), int(x1) + 1:int(x2)].reshape(-1, 3).astype(float)
        assert np.abs(patch.mean(0) - background).max() > 30


def test_the_features_stage_extracts_from_the_coco_folder(world, server, tmp_path):  # noqa: F811
    from aladin.regions import RegionFeatures
    from stages import features as features_stage

    params = _params(tmp_path, serve(server, world["files"], tmp_path / "dl"),
                     features={"min_size": 64, "max_size": 112})
    assert _run(params, tmp_path / "dataset") == 0
    assert features_stage.main(["--params", str(params), "--data", str(tmp_path / "dataset"),
                                "--out", str(tmp_path / "features"), "--no-progress"]) == 0
    regions = RegionFeatures(tmp_path / "features", expected_dim=262)
    assert sorted(regions.image_ids) == sorted(i["cocoid"] for i in world["images"])
    for image in world["images"]:
        feats, tags = regions[image["cocoid"]]
        assert tags == [name for *_, name in image["boxes"]] and feats.shape == (len(tags), 262)
        np.testing.assert_allclose(feats[:, -6:-2], np.array([b[:4] for b in image["boxes"]]) / 64, atol=2e-3)


def test_without_images_the_features_stage_says_what_to_do(world, server, tmp_path, capsys):  # noqa: F811
    from stages import features as features_stage

    params = _params(tmp_path, serve(server, world["files"], tmp_path / "dl"),
                     data={"source": "coco", "coco_images": False})
    assert _run(params, tmp_path / "dataset") == 0
    assert features_stage.main(["--params", str(params), "--data", str(tmp_path / "dataset"),
                                "--out", str(tmp_path / "features")]) == 1
    assert "no images/ folder to extract features from (data.coco_images: false?)" in capsys.readouterr().err
