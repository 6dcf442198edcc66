"""Hostile and broken inputs, one test per row of docs/hostile_inputs.md.

Each bad input is given to the stage that reads it, called as `main([...])` in process: the stage returns 1,
prints one `error: ...` message naming the file, line or key (no traceback), and its output is either absent
or, where an older one was there, unchanged byte for byte, with no temporary file left beside it.
"""
from __future__ import annotations

import argparse
import base64
import errno
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from coco_fixture import serve, write_coco_world
from loopback import server  # noqa: F401  (a fixture)
from micro import ROOT, micro_world
from safetensors.torch import load_file, save_file

from aladin import synthetic, train
from aladin.backbone import load_backbone, write_initial_checkpoint
from aladin.config import load_params
from aladin.data import load_karpathy
from aladin.io import PipelineError, WriteError, atomic_path, error_message
from aladin.model import Aladin
from aladin.regions import RegionFeatures
from aladin.tsv import TSVFile, write_tsv
from stages import data as data_stage
from stages import evaluate as evaluate_stage
from stages import features as features_stage
from stages import import_checkpoint, train_alignment

MICRO = {
    "data": {"n_train": 12, "n_val": 6, "n_test": 6, "image_size": 64, "single_1k_size": 3},
    "backbone": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
    "features": {"min_size": 64, "max_size": 112},
    "model": {"matching_ff": 16},
    "train_alignment": {"epochs": 1, "batch_size": 8},
    "distill": {"epochs": 1, "batch_size": 8},
    "eval": {"fold_size": 3, "latency_queries": 2, "qualitative_queries": 2},
}
DOCS = ROOT / "docs" / "hostile_inputs.md"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The micro dataset, backbone and features (read-only: tests copy what they break), and an untrained
    model folder in the format `stages.evaluate --model` reads."""
    root = tmp_path_factory.mktemp("hostile")
    params = load_params(micro_world(root, MICRO))
    model = Aladin(load_backbone(root / "backbone"), params.model, params.compat)
    train.save_model(model, root / "model", root / "backbone", {"stage": "test"})
    return root


# ---------------------------------------------------------------------------------------------------
# Helpers


def one_error(capsys, rc: int, *fragments: str, lines: int = 1) -> str:
    """The stage failed with exit code 1 and one `error:` message (of `lines` lines) holding `fragments`."""
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err, err
    assert err.count("\n") == lines, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def params_with(world: Path, tmp_path: Path, **edits) -> Path:
    """The world's params with dotted keys set (`train_alignment__lr=...` for `train_alignment.lr`)."""
    raw = yaml.safe_load((world / "params.yaml").read_text())
    for dotted, value in edits.items():
        *sections, key = dotted.split("__")
        node = raw
        for s in sections:
            node = node.setdefault(s, {})
        node[key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def copy(world: Path, tmp_path: Path, name: str) -> Path:
    shutil.copytree(world / name, tmp_path / name)
    return tmp_path / name


def snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def no_temporaries(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not left, left


def run_data(params: Path, out: Path) -> int:
    return data_stage.main(["--params", str(params), "--out", str(out / "dataset"),
                            "--backbone-out", str(out / "backbone")])


def assert_no_data(out: Path) -> None:
    assert not (out / "dataset").exists() and not (out / "backbone").exists()
    if out.exists():
        no_temporaries(out)


def run_features(params: Path, dataset: Path, out: Path) -> int:
    return features_stage.main(["--params", str(params), "--data", str(dataset), "--out", str(out),
                                "--no-progress"])


def run_train(world: Path, params: Path, out: Path, dataset=None, features=None, backbone=None,
              resume: Path | None = None) -> int:
    argv = ["--params", str(params), "--dataset", str(dataset or world / "dataset"),
            "--features", str(features or world / "features"), "--backbone", str(backbone or world / "backbone"),
            "--out", str(out), "--live", str(out) + "_live", "--device", "cpu", "--num-workers", "0"]
    return train_alignment.main(argv + (["--resume-dir", str(resume)] if resume else []))


def run_evaluate(world: Path, out: Path, params=None, dataset=None, features=None, model=None) -> int:
    return evaluate_stage.main([
        "--params", str(params or world / "params.yaml"), "--dataset", str(dataset or world / "dataset"),
        "--features", str(features or world / "features"), "--model", str(model or world / "model"),
        "--metrics", str(out / "eval.json"), "--latency", str(out / "latency.json"),
        "--qualitative", str(out / "qualitative.json")])


def assert_no_evaluation(out: Path) -> None:
    assert not any((out / n).exists() for n in ("eval.json", "latency.json", "qualitative.json"))


def feature_row(world: Path, split: str, k: int = 0) -> int:
    """0-based row of features.tsv holding image `k` of `split` (the rows are train, val, test in order)."""
    image_id = load_karpathy(world / "dataset", split)[k].image_id
    return json.loads((world / "features" / "imageid2idx.json").read_text())[str(image_id)]


def rewrite_row(features: Path, row: int, edit) -> None:
    """Replace row `row` of features.tsv by `edit(columns)`, writing a .lineidx that matches the new file,
    so that the reader sees exactly the broken row and nothing else."""
    with TSVFile(features / "features.tsv") as tsv:
        rows = [list(r) for r in tsv]
    rows[row] = edit(rows[row])
    write_tsv(features / "features.tsv", rows)


def _floats(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4").copy()


def _b64(values: np.ndarray) -> str:
    return base64.b64encode(values.astype("<f4").tobytes()).decode()


def _with_nan(cols):
    values = _floats(cols[2])
    values[5] = np.nan
    return [cols[0], cols[1], _b64(values)]


# ---------------------------------------------------------------------------------------------------
# params.yaml: unknown keys, wrong types, out-of-range values


@pytest.mark.parametrize("edit, message", [
    ({"train_alignment__learning_rate": 1e-3}, "unknown key 'train_alignment.learning_rate'"),
    ({"trian_alignment": {"lr": 1e-3}}, "unknown key 'trian_alignment'"),
    ({"features__detector__nms": 1}, "unknown key 'features.detector.nms'"),
])
def test_unknown_params_key(world, tmp_path, capsys, edit, message):
    params = params_with(world, tmp_path, **edit)
    one_error(capsys, run_data(params, tmp_path / "out"), str(params), message)
    assert_no_data(tmp_path / "out")


@pytest.mark.parametrize("edit, message", [
    ({"train_alignment__batch_size": "big"}, "train_alignment.batch_size must be an integer, got 'big'"),
    ({"data__n_train": 1.5}, "data.n_train must be an integer, got 1.5"),
    ({"distill__lr": "fast"}, "distill.lr must be a number, got 'fast'"),
    ({"distill__temperature": float("nan")}, "distill.temperature must be a finite number, got nan"),
    ({"compat__first_region_as_cls": "yes"}, "compat.first_region_as_cls must be true or false, got 'yes'"),
    ({"features__blocks": 3}, "features.blocks must be a list, got 3"),
    ({"model__alignment_mode": "MrSW"}, "model.alignment_mode must be one of"),
])
def test_wrong_params_type(world, tmp_path, capsys, edit, message):
    params = params_with(world, tmp_path, **edit)
    one_error(capsys, run_data(params, tmp_path / "out"), str(params), message)
    assert_no_data(tmp_path / "out")


@pytest.mark.parametrize("edit, message", [
    ({"distill__temperature": -1.0}, "distill.temperature must be positive"),
    ({"eval__fold_size": 7}, "eval.fold_size (7) is larger than the test split (data.n_test = 6)"),
    ({"train_alignment__lr_step": 0}, "train_alignment.lr_step must be positive, got 0"),
    ({"model__matching_heads": 0}, "model.matching_heads must be positive, got 0"),
    ({"backbone__hidden_dropout_prob": 1.0}, "backbone.hidden_dropout_prob must be in [0, 1), got 1.0"),
    ({"seed": -1}, "seed must be in [0, 2**32), got -1"),
])
def test_params_value_out_of_range(world, tmp_path, capsys, edit, message):
    params = params_with(world, tmp_path, **edit)
    out = tmp_path / "model"
    one_error(capsys, run_train(world, params, out), str(params), message)
    assert not out.exists()


def test_fold_size_larger_than_the_test_split_of_a_downloaded_dataset(world, tmp_path, capsys):
    # data.source coco: the params cannot know the split's size, so the evaluate stage checks it.
    params = params_with(world, tmp_path, data__source="coco", eval__fold_size=7)
    one_error(capsys, run_evaluate(world, tmp_path, params=params), "eval.fold_size (7)", "6 images",
              str(world / "dataset"))
    assert_no_evaluation(tmp_path)


# ---------------------------------------------------------------------------------------------------
# features.tsv, its .lineidx, imageid2idx.json


@pytest.mark.parametrize("edit, message", [
    (lambda c: [c[0], c[1], c[2][: len(c[2]) // 8 * 4]], "bytes of features, expected num_boxes x dim x 4"),
    (lambda c: [c[0], c[1], c[2][:-6] + "@@@@@@"], "feature column is not valid base64"),
    (lambda c: [c[0], "-3", c[2]], "num_boxes '-3' is not a positive integer"),
    (lambda c: [c[0], c[1]], "expected 3 tab-separated columns, found 2"),
    (_with_nan, "region 0 value 5 is nan; features must be finite"),
    (lambda c: [str(int(c[0]) + 1), c[1], c[2]], "row holds image id"),
], ids=["truncated", "base64", "count", "columns", "nan", "id"])
def test_corrupted_features_row(world, tmp_path, capsys, edit, message):
    features = copy(world, tmp_path, "features")
    row = feature_row(world, "test", 2)
    rewrite_row(features, row, edit)
    one_error(capsys, run_evaluate(world, tmp_path, features=features), f"{features / 'features.tsv'}:{row + 1}: ",
              message)
    assert_no_evaluation(tmp_path)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, features: RegionFeatures):
        self.features, self.ids = features, features.image_ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return torch.from_numpy(self.features[self.ids[i]][0])


def test_corrupted_row_read_in_a_dataloader_worker_keeps_its_message(world, tmp_path):
    # Training reads its regions in DataLoader workers on CUDA; the worker's error comes back wrapped in
    # its traceback, and `error_message` gives back the one line the main process would have printed.
    features = copy(world, tmp_path, "features")
    row = feature_row(world, "train", 3)
    rewrite_row(features, row, lambda c: [c[0], "-3", c[2]])
    loader = torch.utils.data.DataLoader(_Rows(RegionFeatures(features)), batch_size=None, num_workers=1)
    with pytest.raises(PipelineError) as e:
        list(loader)
    assert "Original Traceback" in str(e.value)
    assert error_message(e.value) == f"{features / 'features.tsv'}:{row + 1}: num_boxes '-3' is not a positive integer"


def test_corrupted_training_row_read_by_a_worker_is_one_line(world, tmp_path, capsys):
    features = copy(world, tmp_path, "features")
    row = feature_row(world, "train", 3)
    rewrite_row(features, row, lambda c: [c[0], "-3", c[2]])
    params = world / "params.yaml"
    rc = train_alignment.main(["--params", str(params), "--dataset", str(world / "dataset"), "--features",
                               str(features), "--backbone", str(world / "backbone"), "--out", str(tmp_path / "model"),
                               "--live", str(tmp_path / "live"), "--device", "cpu", "--num-workers", "1"])
    one_error(capsys, rc, f"{features / 'features.tsv'}:{row + 1}: num_boxes '-3' is not a positive integer")
    assert not (tmp_path / "model").exists()


def test_features_file_cut_mid_row(world, tmp_path, capsys):
    features = copy(world, tmp_path, "features")
    tsv = features / "features.tsv"
    tsv.write_bytes(tsv.read_bytes()[:-100])  # the last row (a test image) loses its end
    n = len(TSVFile(tsv))
    one_error(capsys, run_evaluate(world, tmp_path, features=features), f"{tsv}:{n}: ",
              "the file is truncated or the index stale")
    assert_no_evaluation(tmp_path)


@pytest.mark.parametrize("name, kind, where, message", [
    (name, *case) for name in ("features", "predictions") for case in [
        ("shifted", "tsv_row", "offset {offset} is not at a line start; the index does not match the file"),
        ("past_end", "idx_last", "is past the end of"),
        ("decreasing", "idx_row2", "does not increase"),
        ("garbage", "idx_row", "not a byte offset"),
    ]] + [("features", "fewer_rows", "json", "is not an integer image id with a row of features.tsv")])
def test_lineidx_disagrees_with_its_tsv(world, tmp_path, capsys, name, kind, where, message):
    features = copy(world, tmp_path, "features")
    idx, tsv = features / f"{name}.lineidx", features / f"{name}.tsv"
    offsets = [int(x) for x in idx.read_text().split()]
    row = feature_row(world, "test", 0)  # the first row the evaluate stage reads after row 0
    lines = [str(o) for o in offsets]
    if kind == "shifted":  # as if the index were written for another file
        lines[row] = str(offsets[row] + 1)
    elif kind == "past_end":
        lines.append(str(10**9))
    elif kind == "decreasing":
        lines[row], lines[row + 1] = lines[row + 1], lines[row]
    elif kind == "garbage":
        lines[row] = "12a"
    else:  # the last row left out
        lines = lines[:-1]
    idx.write_text("".join(f"{x}\n" for x in lines))
    located = {"tsv_row": f"{tsv}:{row + 1}: ", "idx_row": f"{idx}:{row + 1}: ", "idx_row2": f"{idx}:{row + 2}: ",
               "idx_last": f"{idx}:{len(lines)}: ", "json": f"{features / 'imageid2idx.json'}: entry "}[where]
    one_error(capsys, run_evaluate(world, tmp_path, features=features), located,
              message.format(offset=offsets[row] + 1))
    assert_no_evaluation(tmp_path)


def test_missing_lineidx(world, tmp_path, capsys):
    features = copy(world, tmp_path, "features")
    (features / "features.lineidx").unlink()
    one_error(capsys, run_evaluate(world, tmp_path, features=features),
              f"{features / 'features.lineidx'}: file not found (the index of features.tsv)")
    assert_no_evaluation(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Feature dimension: params, extractor, backbone


def test_feature_dim_disagrees_with_params(world, tmp_path, capsys):
    params = params_with(world, tmp_path, model__img_feature_dim=100)
    one_error(capsys, run_train(world, params, tmp_path / "model"), f"{world / 'features' / 'features.tsv'}: ",
              "D+6 = 262 values per region but params model.img_feature_dim is 100")
    assert not (tmp_path / "model").exists()
    # The features stage refuses before extracting anything.
    one_error(capsys, run_features(params, world / "dataset", tmp_path / "features"), str(params),
              "the extractor writes D+6 = 256+6 = 262 values per region", "model.img_feature_dim is 100")
    assert not (tmp_path / "features").exists()


def test_feature_dim_disagrees_with_the_backbone(world, tmp_path, capsys):
    # A backbone written for 100-value regions, consistent in itself; params and features say 262.
    params = load_params(world / "params.yaml")
    write_initial_checkpoint(tmp_path / "backbone", synthetic.vocabulary(), params.backbone, 100, 0)
    one_error(capsys, run_train(world, world / "params.yaml", tmp_path / "model", backbone=tmp_path / "backbone"),
              f"{tmp_path / 'backbone' / 'config.json'}: img_feature_dim is 100",
              f"the region vectors of {world / 'features' / 'features.tsv'} have D+6 = 262 values")
    assert not (tmp_path / "model").exists()


def test_feature_dim_disagrees_with_the_model(world, tmp_path, capsys):
    model = copy(world, tmp_path, "model")
    config = json.loads((model / "config.json").read_text())
    config["img_feature_dim"] = 100
    (model / "config.json").write_text(json.dumps(config))
    weights = load_file(model / "model.safetensors")
    key = next(k for k in weights if k.endswith("img_embedding.weight"))
    weights[key] = weights[key][:, :100].contiguous()
    save_file(weights, model / "model.safetensors")
    one_error(capsys, run_evaluate(world, tmp_path, model=model), f"{model / 'config.json'}: img_feature_dim is 100")
    assert_no_evaluation(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Images, captions, splits


def _png(world: Path, k: int = 4) -> str:
    return sorted(p.name for p in (world / "dataset" / "images").iterdir())[k]


@pytest.mark.parametrize("damage, message", [
    ("missing", "image file not found"),
    ("empty", "cannot decode image"),
    ("garbage", "cannot decode image"),
    ("truncated", "cannot decode image"),
])
def test_missing_or_undecodable_image(world, tmp_path, capsys, damage, message):
    dataset = copy(world, tmp_path, "dataset")
    victim = dataset / "images" / _png(world)
    good = victim.read_bytes()
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes({"empty": b"", "garbage": b"GIF89a" + bytes(range(256)) * 4,
                            "truncated": good[: len(good) // 2]}[damage])
    one_error(capsys, run_features(world / "params.yaml", dataset, tmp_path / "features"), f"{victim}: {message}")
    assert not (tmp_path / "features").exists()


def test_annotation_refers_to_unknown_image(world, tmp_path, capsys):
    dataset = copy(world, tmp_path, "dataset")
    path = dataset / "annotations" / "instances.json"
    doc = json.loads(path.read_text())
    doc["annotations"][3]["image_id"] = 987654321
    path.write_text(json.dumps(doc))
    ann = doc["annotations"][3]["id"]
    one_error(capsys, run_features(world / "params.yaml", dataset, tmp_path / "features"),
              f"{path}: annotation id {ann}: refers to unknown image id 987654321")
    assert not (tmp_path / "features").exists()


def test_split_image_without_region_features(world, tmp_path, capsys):
    features = copy(world, tmp_path, "features")
    image_id = load_karpathy(world / "dataset", "test")[1].image_id
    index = json.loads((features / "imageid2idx.json").read_text())
    del index[str(image_id)]
    (features / "imageid2idx.json").write_text(json.dumps(index))
    one_error(capsys, run_evaluate(world, tmp_path, features=features),
              f"{features}: no region features for 1 image(s) of split 'test', e.g. image id {image_id}")
    assert_no_evaluation(tmp_path)


@pytest.mark.parametrize("split", ["val", "test"])
def test_empty_split(world, tmp_path, capsys, split):
    dataset = copy(world, tmp_path, "dataset")
    path = dataset / "dataset_coco.json"
    doc = json.loads(path.read_text())
    doc["images"] = [i for i in doc["images"] if i["split"] != split]
    path.write_text(json.dumps(doc))
    if split == "val":
        rc = run_train(world, world / "params.yaml", tmp_path / "model", dataset=dataset)
    else:
        rc = run_evaluate(world, tmp_path, dataset=dataset)
    one_error(capsys, rc, f"{path}: split '{split}' has no images")
    assert not (tmp_path / "model").exists()
    assert_no_evaluation(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Checkpoints and pickles


def _edit_weights(model: Path, kind: str) -> str:
    weights = load_file(model / "model.safetensors")
    key = sorted(weights)[3]
    if kind == "missing":
        del weights[key]
    elif kind == "extra":
        key = "matching_head.extra.weight"
        weights[key] = torch.zeros(2)
    else:
        weights[key] = torch.zeros(3, 3)
    save_file(weights, model / "model.safetensors")
    return key


@pytest.mark.parametrize("kind, message", [
    ("missing", "missing keys: {key}"),
    ("extra", "unexpected keys: {key}"),
    ("shape", "wrong shapes: {key} (3, 3) != "),
])
def test_checkpoint_with_missing_or_extra_keys(world, tmp_path, capsys, kind, message):
    model = copy(world, tmp_path, "model")
    key = _edit_weights(model, kind)
    one_error(capsys, run_evaluate(world, tmp_path, model=model),
              f"{model / 'model.safetensors'}: does not match params (model, compat)", message.format(key=key))
    assert_no_evaluation(tmp_path)


def test_backbone_with_missing_keys(world, tmp_path, capsys):
    backbone = copy(world, tmp_path, "backbone")
    state = torch.load(backbone / "pytorch_model.bin", weights_only=True)
    key = "bert.encoder.layer.0.output.dense.weight"
    del state[key]
    torch.save(state, backbone / "pytorch_model.bin")
    one_error(capsys, run_train(world, world / "params.yaml", tmp_path / "model", backbone=backbone),
              f"{backbone}: checkpoint does not match config.json; missing keys: {key}")
    assert not (tmp_path / "model").exists()


class Reduce:
    """Pickles as the call `func(*args)`: the classic pickle exploit."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("where", ["released_checkpoint", "backbone_weights"])
def test_pickle_that_builds_an_arbitrary_object(world, tmp_path, capsys, where):
    canary = tmp_path / "canary"
    payload = Reduce(os.system, f"touch {canary}")
    if where == "released_checkpoint":
        path = tmp_path / "model_best_rsum.pth.tar"
        torch.save({"model": {"w": torch.ones(2)}, "opt": argparse.Namespace(lr=1.0), "x": payload}, path)
        rc = import_checkpoint.main(["--params", str(world / "params.yaml"), "--checkpoint", str(path),
                                     "--backbone", str(world / "backbone"), "--out", str(tmp_path / "model")])
        one_error(capsys, rc, f"{path}: refused to unpickle global(s) ", "system")
    else:
        backbone = copy(world, tmp_path, "backbone")
        path = backbone / "pytorch_model.bin"
        state = torch.load(path, weights_only=True)
        torch.save(dict(state, x=payload), path)
        rc = run_train(world, world / "params.yaml", tmp_path / "model", backbone=backbone)
        one_error(capsys, rc, f"{path}: cannot be read as a plain tensor checkpoint")
    assert not canary.exists()  # the payload never ran
    assert not (tmp_path / "model").exists()


# ---------------------------------------------------------------------------------------------------
# Downloads (data.source coco, from archives served on loopback)


@pytest.fixture(scope="module")
def coco_world(tmp_path_factory):
    return write_coco_world(tmp_path_factory.mktemp("upstream"), seed=5, n_train=4, n_restval=1, n_val=2, n_test=2)


def _coco_params(tmp_path: Path, downloads: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"data": {"source": "coco", "coco_images": False}, "downloads": downloads,
                                    "eval": {"fold_size": 2}}))
    return path


def _rezip(src: Path, dst: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info)))
    return dst


@pytest.mark.parametrize("member", ["../escaped.txt", "dataset/../../escaped.txt", "/tmp/escaped.txt"])
def test_archive_with_escaping_members(coco_world, server, tmp_path, capsys, member):  # noqa: F811
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("dataset_coco.json", json.dumps(coco_world["karpathy"]))
        info = zipfile.ZipInfo(member)
        zf.writestr(info, b"pwned")
    dl = tmp_path / "dl"
    params = _coco_params(tmp_path, serve(server, dict(coco_world["files"], karpathy_split=evil.getvalue()), dl))
    one_error(capsys, run_data(params, tmp_path / "out"), "downloads.karpathy_split: ",
              f"{dl / 'caption_datasets.zip'}: refusing member {member!r}")
    assert not (dl / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not (dl / "caption_datasets").exists()  # nothing extracted
    assert_no_data(tmp_path / "out")


def test_download_checksum_mismatch(coco_world, server, tmp_path, capsys):  # noqa: F811
    dl = tmp_path / "dl"
    downloads = serve(server, coco_world["files"], dl)
    downloads["karpathy_split"]["sha256"] = hashlib.sha256(b"another file").hexdigest()
    url = downloads["karpathy_split"]["urls"][0]
    err = one_error(capsys, run_data(_coco_params(tmp_path, downloads), tmp_path / "out"),
                    "downloads.karpathy_split: could not download caption_datasets.zip", url, "sha256 mismatch",
                    f"Place the file by hand at {(dl / 'caption_datasets.zip').resolve()}", lines=3)
    assert err.splitlines()[1].startswith(f"  {url}: ")  # one line per mirror tried
    assert not (dl / "caption_datasets.zip").exists() and not list(dl.glob(".*.part"))
    assert_no_data(tmp_path / "out")


def test_captions_refer_to_unknown_image(coco_world, server, tmp_path, capsys):  # noqa: F811
    def orphan_caption(name, payload):
        if not name.endswith("captions_val2014.json"):
            return payload
        doc = json.loads(payload)
        doc["annotations"][0]["image_id"] = 987654321
        return json.dumps(doc).encode()

    files = dict(coco_world["files"], coco_annotations=_rezip(
        coco_world["files"]["coco_annotations"], tmp_path / "annotations_trainval2014.zip", orphan_caption))
    dl = tmp_path / "dl"
    params = _coco_params(tmp_path, serve(server, files, dl))
    one_error(capsys, run_data(params, tmp_path / "out"),
              f"{dl / 'annotations_trainval2014' / 'annotations' / 'captions_val2014.json'}: annotation id ",
              "refers to unknown image id 987654321")
    assert_no_data(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------
# A full disk while writing


@pytest.fixture
def full_disk(monkeypatch):
    """Every pathlib write into a temporary output name fails as on a full disk (ENOSPC)."""
    real_text, real_bytes = pathlib.Path.write_text, pathlib.Path.write_bytes

    def refuse(real):
        def write(self, *args, **kwargs):
            if any(".tmp-" in part for part in self.parts):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(self, *args, **kwargs)
        return write

    monkeypatch.setattr(pathlib.Path, "write_text", refuse(real_text))
    monkeypatch.setattr(pathlib.Path, "write_bytes", refuse(real_bytes))


@pytest.mark.parametrize("stage", ["evaluate", "data"])
def test_full_disk_during_a_write(world, tmp_path, capsys, stage, request):
    if stage == "evaluate":
        out, target = tmp_path, tmp_path / "eval.json"
        for name in ("eval.json", "latency.json", "qualitative.json"):
            (out / name).write_text('{"old": true}\n')
        before = {n: snapshot(out / n) for n in ("eval.json", "latency.json", "qualitative.json")}
        request.getfixturevalue("full_disk")
        rc = run_evaluate(world, out)
        after = {n: snapshot(out / n) for n in before}
    else:
        out, target = tmp_path, tmp_path / "dataset"
        shutil.copytree(world / "dataset", target)
        shutil.copytree(world / "backbone", tmp_path / "backbone")
        before = {n: snapshot(tmp_path / n) for n in ("dataset", "backbone")}
        request.getfixturevalue("full_disk")
        rc = run_data(world / "params.yaml", out)
        after = {n: snapshot(tmp_path / n) for n in before}
    one_error(capsys, rc, f"{target}: cannot write (No space left on device", "the previous output is kept")
    assert after == before
    no_temporaries(tmp_path)


def test_failed_rename_puts_the_previous_folder_back(tmp_path, monkeypatch):
    # The last step of a folder write: the old folder is moved aside, the new one renamed in. If that
    # rename fails the old one goes back, so the output is never missing.
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    real = os.replace

    def replace(src, dst):
        if ".out.tmp-" in str(src):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteError, match=f"^{re.escape(str(target))}: cannot write .*the previous output is kept$"):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "a.txt").write_text("new")
    assert snapshot(target) == {"a.txt": b"old"}
    no_temporaries(tmp_path)


# ---------------------------------------------------------------------------------------------------
# A loss that becomes NaN or infinite


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_training_and_keeps_the_last_good_state(world, tmp_path, capsys, monkeypatch, value):
    real = train.batch_loss

    def poisoned(model, recipe, images, texts, epoch, d):
        loss, terms = real(model, recipe, images, texts, epoch, d)
        return (loss * value if epoch == 1 else loss), terms  # a real NaN/inf gradient reaches the weights

    monkeypatch.setattr(train, "batch_loss", poisoned)
    params = params_with(world, tmp_path, train_alignment__epochs=2)
    out, resume = tmp_path / "model", tmp_path / "resume"
    rc = run_train(world, params, out, resume=resume)
    one_error(capsys, rc, f"loss is {value} at epoch 1, batch 0 of the epoch", "are kept")
    # The last good checkpoint: epoch 0's best model in --out and its resume state, finite and identical.
    assert json.loads((out / train.META).read_text())["best_epoch"] == 0
    best = load_file(out / train.WEIGHTS)
    state = load_file(resume / train.STATE / train.WEIGHTS)
    assert best.keys() == state.keys()
    for k in best:
        assert torch.isfinite(best[k]).all() and torch.equal(best[k], state[k]), k
    assert snapshot(resume / train.BEST) == snapshot(out)


# ---------------------------------------------------------------------------------------------------
# The table cannot rot


def test_docs_table_names_only_tests_of_this_module_and_every_test_has_a_row():
    text = DOCS.read_text()
    rows = [line for line in text.splitlines() if line.startswith("|") and not set(line) <= set("|-: ")]
    named = re.findall(r"tests/test_hostile_inputs\.py::(\w+)", text)
    assert named and len(rows) > len(set(named)) // 2
    module = globals()
    missing = sorted(n for n in set(named) if not callable(module.get(n)) or not n.startswith("test_"))
    assert not missing, f"{DOCS} names tests that do not exist: {missing}"
    tests = {n for n in module if n.startswith("test_")} - {"test_docs_table_names_only_tests_of_this_module_and_every_test_has_a_row"}
    assert tests <= set(named), f"tests without a row in {DOCS}: {sorted(tests - set(named))}"
    for row in rows[1:]:  # every row past the header names its test
        assert "tests/test_hostile_inputs.py::" in row, row
