"""BUTD-36 layout (TERAN's bu_att/bu_box): VinVL -> BUTD -> VinVL round trip on a real features folder,
hand-computed pixel boxes, padding and the 36 cap, reader errors that name their file, atomic output."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from aladin import butd
from aladin.features import ImageRegions, write_region_files
from aladin.io import PipelineError
from aladin.regions import RegionFeatures
from micro import ROOT, micro_world

MICRO = {
    "data": {"n_train": 6, "n_val": 3, "n_test": 3, "image_size": 64, "single_1k_size": 3},
    "backbone": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
    "features": {"min_size": 64, "max_size": 112},
    "eval": {"fold_size": 3},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("butd")
    torch.set_num_threads(1)
    micro_world(root, MICRO)
    return root


def _hand_world(root, boxes_by_id, sizes, dim=5, seed=0):
    """A VinVL features folder and a dataset holding only instances.json sizes: image id -> pixel boxes."""
    rng = np.random.default_rng(seed)
    items = [ImageRegions(i, *sizes[i], [tuple(map(float, b)) for b in bx], ["thing"] * len(bx), [1.0] * len(bx),
                          rng.standard_normal((len(bx), dim)).astype(np.float32))
             for i, bx in boxes_by_id.items()]
    (root / "features").mkdir(parents=True)
    write_region_files(root / "features", items)
    (root / "dataset" / "annotations").mkdir(parents=True)
    images = [{"id": i, "width": w, "height": h} for i, (w, h) in sizes.items()]
    (root / "dataset" / "annotations" / "instances.json").write_text(json.dumps({"images": images}))
    return RegionFeatures(root / "features")


def test_round_trip_vinvl_butd_vinvl_on_the_micro_world(world, tmp_path):
    original = RegionFeatures(world / "features")
    assert butd.write_butd(original, world / "dataset", tmp_path / "butd") == len(original)
    assert butd.write_vinvl(tmp_path / "butd", tmp_path / "back", world / "dataset") == len(original)
    back = RegionFeatures(tmp_path / "back", expected_dim=original.dim)
    assert back.image_ids == original.image_ids  # the features stage's split order
    sizes = json.loads((tmp_path / "butd" / "sizes.json").read_text())
    counts = json.loads((tmp_path / "butd" / "counts.json").read_text())
    for image_id in original.image_ids:
        want, _ = original[image_id]
        got, tags = back[image_id]
        assert got.shape == want.shape and tags == []  # BUTD carries no classes
        np.testing.assert_array_equal(got[:, :-6], want[:, :-6])  # no arithmetic on the features
        np.testing.assert_allclose(got[:, -6:], want[:, -6:], rtol=0, atol=1e-5)
        feat, boxes, size, count = butd.read_butd(tmp_path / "butd", image_id)
        assert feat.shape == (36, original.dim - 6) and boxes.shape == (36, 4) and feat.dtype == np.float32
        assert size == (64, 64) and sizes[str(image_id)] == [64, 64] and count == counts[str(image_id)] == len(want)
        np.testing.assert_allclose(boxes[:count], want[:, -6:-2] * 64, rtol=0, atol=1e-5 * 64)
        assert not feat[count:].any() and not boxes[count:].any()
    # without --dataset: every image of sizes.json, by id, same rows
    assert butd.write_vinvl(tmp_path / "butd", tmp_path / "back2") == len(original)
    by_id = RegionFeatures(tmp_path / "back2")
    assert by_id.image_ids == sorted(original.image_ids)
    np.testing.assert_array_equal(by_id[original.image_ids[0]][0], back[original.image_ids[0]][0])


def test_hand_computed_pixel_boxes_padding_and_the_36_cap(tmp_path):
    many = [(i, 0.0, i + 2.0, 10.0) for i in range(40)]
    rf = _hand_world(tmp_path, {7: [(10, 20, 110, 70), (0, 0, 200, 100)], 9: many}, {7: (200, 100), 9: (50, 10)})
    row7 = rf[7][0]
    np.testing.assert_allclose(row7[0, -6:], [0.05, 0.2, 0.55, 0.7, 0.5, 0.5], rtol=0, atol=1e-7)
    butd.write_butd(rf, tmp_path / "dataset", tmp_path / "butd")
    assert sorted(os.listdir(tmp_path / "butd")) == ["bu_att", "bu_box", "counts.json", "sizes.json"]
    with np.load(tmp_path / "butd" / "bu_att" / "7.npz") as z:  # TERAN's file layout, read as TERAN does
        assert z.files == ["feat"] and z["feat"].shape == (36, 5) and z["feat"].dtype == np.float32
    boxes = np.load(tmp_path / "butd" / "bu_box" / "7.npy")
    assert boxes.shape == (36, 4) and boxes.dtype == np.float32
    np.testing.assert_allclose(boxes[:2], [[10, 20, 110, 70], [0, 0, 200, 100]], rtol=0, atol=1e-4)
    assert not boxes[2:].any()
    feat, _, size, count = butd.read_butd(tmp_path / "butd", 7)
    assert size == (200, 100) and count == 2
    np.testing.assert_array_equal(feat[:2], row7[:, :-6])
    assert not feat[2:].any()
    # 40 detector regions: the first 36 (score order) are kept, all real
    feat, boxes, size, count = butd.read_butd(tmp_path / "butd", 9)
    assert count == 36 and size == (50, 10)
    np.testing.assert_array_equal(feat, rf[9][0][:36, :-6])
    np.testing.assert_allclose(boxes[35], [35, 0, 37, 10], rtol=0, atol=1e-4)
    rows = butd.butd_to_vinvl_regions(feat, boxes, size, count)
    assert rows.shape == (36, 11) and rows.dtype == np.float32
    np.testing.assert_allclose(rows[35, -6:], [35 / 50, 0, 37 / 50, 1, 2 / 50, 1], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "butd" / "counts.json").read_text()) == {"7": 2, "9": 36}
    assert json.loads((tmp_path / "butd" / "sizes.json").read_text()) == {"7": [200, 100], "9": [50, 10]}


def _break(folder, how):
    att, box = folder / "bu_att" / "7.npz", folder / "bu_box" / "7.npy"
    feat = np.zeros((36, 5), np.float32)
    if how == "missing npz":
        att.unlink()
        return att
    if how == "wrong key":
        np.savez(att, features=feat)
        return att
    if how == "wrong shape":
        np.savez(att, feat=np.zeros((10, 5), np.float32))
        return att
    if how == "not an archive":
        att.write_bytes(b"not a zip file")
        return att
    if how == "nan":
        feat[3, 1] = np.nan
        np.savez(att, feat=feat)
        return att
    if how == "box rows":
        np.save(box, np.zeros((35, 4), np.float32))
        return box
    if how == "box outside":
        boxes = np.load(box)
        boxes[1] = [0, 0, 250, 100]  # the image is 200 wide
        np.save(box, boxes)
        return box
    if how == "missing size":
        (folder / "sizes.json").write_text(json.dumps({"9": [50, 10]}))
        return folder / "sizes.json"
    if how == "bad count":
        (folder / "counts.json").write_text(json.dumps({"7": 40, "9": 36}))
        return folder / "counts.json"
    raise AssertionError(how)


ERRORS = ["missing npz", "wrong key", "wrong shape", "not an archive", "nan", "box rows", "box outside",
          "missing size", "bad count"]


@pytest.fixture(scope="module")
def hand_butd(tmp_path_factory):
    root = tmp_path_factory.mktemp("hand")
    rf = _hand_world(root, {7: [(10, 20, 110, 70), (0, 0, 200, 100)], 9: [(1, 1, 2, 2)]}, {7: (200, 100), 9: (50, 10)})
    butd.write_butd(rf, root / "dataset", root / "butd")
    return root


@pytest.mark.parametrize("how", ERRORS)
def test_each_reader_error_names_its_file_and_leaves_no_partial_output(hand_butd, tmp_path, how):
    folder = tmp_path / "butd"
    shutil.copytree(hand_butd / "butd", folder)
    bad = _break(folder, how)
    with pytest.raises(PipelineError) as e:
        butd.read_butd(folder, 7)
    assert str(e.value).startswith(str(bad)), str(e.value)
    butd.read_butd(folder, 9)  # the other image is still fine
    if how == "missing size":
        return  # without a size, image 7 is simply not among the images sizes.json lists
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous output")
    with pytest.raises(PipelineError, match=f"^{re.escape(str(bad))}"):
        butd.write_vinvl(folder, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["old.txt"]  # the previous output is kept whole
    assert sorted(os.listdir(tmp_path)) == ["butd", "out"]  # no temporary folder left behind


def test_writer_refuses_missing_sizes_and_foreign_geometry_without_output(tmp_path):
    rf = _hand_world(tmp_path, {7: [(10, 20, 110, 70)], 9: [(1, 1, 2, 2)]}, {7: (200, 100), 9: (50, 10)})
    instances = tmp_path / "dataset" / "annotations" / "instances.json"
    instances.write_text(json.dumps({"images": [{"id": 7, "width": 200, "height": 100}]}))
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(instances))}: no width/height for image id 9"):
        butd.write_butd(rf, tmp_path / "dataset", tmp_path / "butd")
    assert not (tmp_path / "butd").exists()
    # a box past its image (x2/W = 1.5): the features' row is named
    small = _hand_world(tmp_path / "other", {7: [(10, 20, 300, 70)]}, {7: (200, 100)})
    with pytest.raises(PipelineError, match=r"features\.tsv:1: region 0: box .* is not inside the 200x100 image"):
        butd.write_butd(small, tmp_path / "other" / "dataset", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    geometry = np.zeros((1, 11), np.float32)
    geometry[0, 5:] = [0.1, 0.1, 0.5, 0.5, 0.9, 0.4]  # w/W is not x2/W - x1/W: not VinVL geometry
    with pytest.raises(PipelineError, match="not VinVL box geometry"):
        butd.vinvl_to_butd(geometry, (10, 10))


def test_cli_both_directions_and_one_error_line(world, tmp_path, capsys):
    features = world / "features"
    assert butd.main(["--features", str(features), "--dataset", str(world / "dataset"),
                      "--out", str(tmp_path / "butd")]) == 0
    assert butd.main(["--to-vinvl", str(tmp_path / "butd"), "--out", str(tmp_path / "back")]) == 0
    assert len(RegionFeatures(tmp_path / "back")) == len(RegionFeatures(features))
    capsys.readouterr()
    assert butd.main(["--features", str(features), "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err == "error: --features needs --dataset (the image sizes)\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "aladin.butd", "--to-vinvl", str(tmp_path / "nothing"),
                           "--out", str(tmp_path / "y")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"error: {tmp_path / 'nothing' / 'bu_att'}: folder not found (not a BUTD feature folder)\n"
    assert not (tmp_path / "y").exists()
