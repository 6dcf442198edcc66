"""The features stage's other sources: an existing VinVL feature dump, and the detector files from downloads."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from coco_fixture import serve
from loopback import server  # noqa: F401  (a fixture)

from aladin import synthetic_data
from aladin.config import DataConfig, params_from_dict
from aladin.regions import RegionFeatures
from stages import features as stage

DIM = 10  # D + 6 of the dump
DUMP_FILES = ["features.lineidx", "features.tsv", "imageid2idx.json", "predictions.lineidx", "predictions.tsv"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "dataset"
    synthetic_data.write_dataset(out, DataConfig(n_train=3, n_val=2, n_test=2, image_size=48), seed=1)
    return out  # image ids 1..7


def _write_tsv(path: Path, rows: list[list[str]]) -> None:
    """A TSV and its .lineidx written here from the format description (ALADIN.md 6.4), not with aladin.tsv."""
    lines = ["\t".join(r).encode() + b"\n" for r in rows]
    offsets = np.cumsum([0] + [len(x) for x in lines[:-1]])
    path.write_bytes(b"".join(lines))
    path.with_suffix(".lineidx").write_text("".join(f"{o}\n" for o in offsets))


def write_dump(folder: Path, image_ids: list[int], dim: int = DIM, seed: int = 0) -> dict:
    """A VinVL feature folder; predictions.tsv rows in another order than features.tsv (as some dumps)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for image_id in image_ids:
        n = int(rng.integers(2, 5))
        truth[image_id] = (rng.standard_normal((n, dim)).astype("<f4"), [f"thing{image_id}_{j}" for j in range(n)])
    _write_tsv(folder / "features.tsv", [[str(i), str(len(f)), base64.b64encode(f.tobytes()).decode()]
                                         for i, (f, _) in truth.items()])
    _write_tsv(folder / "predictions.tsv", [
        [str(i), json.dumps({"image_h": 48, "image_w": 48, "objects": [
            {"class": c, "rect": [0, 0, 5, 5], "conf": 0.9} for c in tags]})]
        for i, (_, tags) in reversed(truth.items())])
    (folder / "imageid2idx.json").write_text(json.dumps({str(i): row for row, i in enumerate(truth)}))
    return truth


def _params(tmp_path: Path, features: dict, img_feature_dim: int = DIM, downloads: dict | None = None) -> Path:
    raw = {"features": features, "model": {"img_feature_dim": img_feature_dim}} | (
        {"downloads": downloads} if downloads else {})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(params: Path, dataset: Path, out: Path) -> int:
    return stage.main(["--params", str(params), "--data", str(dataset), "--out", str(out), "--no-progress"])


def test_vinvl_dump_is_checked_and_linked(dataset, tmp_path, capsys):
    dump = tmp_path / "dump"
    truth = write_dump(dump, [4, 99, 2, 7, 1, 6, 3, 5])  # every dataset image, plus one it does not use
    out = tmp_path / "features"
    assert _run(_params(tmp_path, {"source": "vinvl_dump", "dump_dir": str(dump)}), dataset, out) == 0
    assert capsys.readouterr().out.strip() == \
        f"features: 7 images from the VinVL dump {dump} (linked, not extracted) -> {out}"
    assert sorted(p.name for p in out.iterdir()) == DUMP_FILES
    for name in DUMP_FILES:
        assert (out / name).samefile(dump / name)  # hard links: a 50 GB dump is not copied
    regions = RegionFeatures(out, expected_dim=DIM)
    for image_id, (feats, tags) in truth.items():
        got_feats, got_tags = regions[image_id]
        np.testing.assert_array_equal(got_feats, feats)
        assert got_tags == tags


@pytest.mark.parametrize("case, message", [
    ("missing", "image id 5 (images/synthetic_000004.png) of the dataset is not in the dump (2 of 7 images missing)"),
    ("dim", "values per region but params model.img_feature_dim is 12"),
    ("no_lineidx", "predictions.lineidx: file not found (features.dump_dir must hold"),
])
def test_vinvl_dump_errors_name_the_problem_and_leave_no_output(dataset, tmp_path, capsys, case, message):
    dump = tmp_path / "dump"
    write_dump(dump, [1, 2, 3, 4, 6] if case == "missing" else list(range(1, 8)))
    if case == "no_lineidx":
        (dump / "predictions.lineidx").unlink()
    out = tmp_path / "out" / "features"
    (tmp_path / "out").mkdir()
    params = _params(tmp_path, {"source": "vinvl_dump", "dump_dir": str(dump)}, 12 if case == "dim" else DIM)
    assert _run(params, dataset, out) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert list((tmp_path / "out").iterdir()) == []


def test_detector_files_named_download_come_from_the_catalogue(tmp_path, server):  # noqa: F811
    labelmap = json.dumps({"label_to_idx": {"cat": 1}}).encode()
    downloads = serve(server, {"vinvl_detector": b"weights bytes", "vinvl_labelmap": labelmap}, tmp_path / "dl")
    raw = {"features": {"mode": "detect", "detector": {"checkpoint": "download", "labelmap": "download"}},
           "downloads": downloads}
    resolved = stage.resolve_detector_files(params_from_dict(raw))
    det = resolved.features.detector
    assert det.checkpoint == str(tmp_path / "dl" / "vinvl_vg_x152c4.pth")
    assert det.labelmap == str(tmp_path / "dl" / "VG-SGG-dicts-vgoi6-clipped.json")
    assert Path(det.checkpoint).read_bytes() == b"weights bytes" and Path(det.labelmap).read_bytes() == labelmap
    # A path is kept as given, and nothing is fetched for it.
    raw["features"]["detector"]["labelmap"] = "my/labelmap.json"
    n = len(server.log.requests)
    assert stage.resolve_detector_files(params_from_dict(raw)).features.detector.labelmap == "my/labelmap.json"
    assert len(server.log.requests) == n


def test_detect_mode_stage_reads_the_downloaded_checkpoint(dataset, tmp_path, server, capsys):  # noqa: F811
    # Not real weights: the stage fails, naming the file it fetched for `download`, which proves the wiring.
    downloads = serve(server, {"vinvl_detector": b"not a checkpoint"}, tmp_path / "dl")
    features = {"mode": "detect", "detector": {"checkpoint": "download"}}
    assert _run(_params(tmp_path, features, img_feature_dim=262, downloads=downloads), dataset,
                tmp_path / "features") == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'dl' / 'vinvl_vg_x152c4.pth'}: not a loadable PyTorch weights file" in err, err
