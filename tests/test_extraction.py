"""Extraction at scale: shards, merge, resume, error policy, workers (aladin/extraction.py, stages/features.py).

The reference for every byte comparison is `legacy`: the single-process loop this driver replaced
(consecutive batches of `features.batch_size`, `given_box_regions`, `write_region_files`).
"""
from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from aladin import data, extraction, synthetic_data
from aladin import features as F
from aladin.regions import RegionFeatures
from aladin.config import DataConfig, FeaturesConfig, Params
from aladin.io import PipelineError
from aladin.tsv import TSVFile
from stages import features as stage

PARAMS = Params(features=replace(FeaturesConfig(), batch_size=3))  # 8 images -> batches of 3, 3, 2
NAMES = ["features.lineidx", "features.tsv", "imageid2idx.json", "predictions.lineidx", "predictions.tsv"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "dataset"
    synthetic_data.write_dataset(root, DataConfig(n_train=4, n_val=2, n_test=2), seed=0)
    return root


def records_of(dataset_dir):
    return [r for s in ("train", "val", "test") for r in data.load_karpathy(dataset_dir, s)]


def legacy(dataset_dir, out_dir, params=PARAMS) -> Path:
    """The pre-sharding extractor, written out plainly: consecutive batches, one writer."""
    records, instances = records_of(dataset_dir), data.load_instances(dataset_dir)
    model = F.build_extractor(params.features, params.seed)
    size = params.features.batch_size
    items = []
    for start in range(0, len(records), size):
        batch = records[start:start + size]
        images = [data.load_image(dataset_dir, r) for r in batch]
        items += [r.sorted_by_conf() for r in F.given_box_regions(model, batch, images, instances)]
    Path(out_dir).mkdir(parents=True)
    F.write_region_files(out_dir, items)
    return Path(out_dir)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    return legacy(dataset, tmp_path_factory.mktemp("ref") / "features")


def contents(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def test_single_process_equals_legacy_bytes(dataset, reference, tmp_path):
    out = tmp_path / "features"
    outcome = extraction.extract_dataset(dataset, out, PARAMS)
    assert (outcome.images, outcome.written, outcome.resumed, outcome.failures) == (8, 8, 0, [])
    assert sorted(contents(out)) == NAMES
    assert contents(out) == contents(reference)
    assert not extraction.shard_root(out).exists()  # the one-rank shard is gone after the merge
    assert F.extract_dataset(dataset, tmp_path / "plain", PARAMS) == 8  # the plain loop agrees
    assert contents(tmp_path / "plain") == contents(reference)


def shard_ids(directory) -> list[int]:
    return [int(row[0]) for row in TSVFile(Path(directory) / "features.tsv")]


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_merged_equal_single_process(dataset, reference, tmp_path, world_size):
    out = tmp_path / "features"
    order = [r.image_id for r in records_of(dataset)]
    dirs = [extraction.shard_dir(out, r) for r in range(world_size)]
    for rank, d in enumerate(dirs):
        got = extraction.extract_shard(dataset, d, PARAMS, rank=rank, world_size=world_size)
        batches = [order[s:s + 3] for s in range(0, 8, 3)][rank::world_size]  # global batches r, r + W, ...
        assert shard_ids(d) == [i for b in batches for i in b] and got.written == got.images
        assert sorted(p.name for p in d.iterdir()) == sorted(NAMES[:2] + NAMES[3:] + ["failures.jsonl", "shard.json"])
    merged = extraction.merge_shards(dirs[::-1], out, order)  # shard order does not matter
    assert merged.written == 8
    assert contents(out) == contents(reference)


def test_batch_size_one_shards_by_image(dataset, tmp_path):
    params = Params(features=replace(PARAMS.features, batch_size=1))
    order = [r.image_id for r in records_of(dataset)]
    extraction.extract_shard(dataset, tmp_path / "r1", params, rank=1, world_size=3)
    assert shard_ids(tmp_path / "r1") == order[1::3]  # images r, r + W, r + 2W


def test_merge_refuses_incomplete_or_mixed_shards(dataset, tmp_path):
    out = tmp_path / "features"
    order = [r.image_id for r in records_of(dataset)]
    d0, d1 = extraction.shard_dir(out, 0), extraction.shard_dir(out, 1)
    extraction.extract_shard(dataset, d0, PARAMS, rank=0, world_size=2)
    with pytest.raises(PipelineError, match=r"rank-001/shard\.json: file not found"):
        extraction.merge_shards([d0, d1], out, order)
    with pytest.raises(PipelineError, match=r"ranks \[0, 0\], expected 0..1"):
        extraction.merge_shards([d0, d0], out, order)
    other = Params(seed=1, features=PARAMS.features)
    extraction.extract_shard(dataset, d1, other, rank=1, world_size=2)
    with pytest.raises(PipelineError, match="different settings"):
        extraction.merge_shards([d0, d1], out, order)
    with pytest.raises(Stop):  # killed before its one batch: the stale rows are gone, no new ones
        extraction.extract_shard(dataset, d1, PARAMS, rank=1, world_size=2, on_batch=stop_after(0))
    with pytest.raises(PipelineError, match=r"3 images have no row in any shard .*image ids "
                                            rf"{order[3]}, {order[4]}, {order[5]}\).*rerun"):
        extraction.merge_shards([d0, d1], out, order)
    assert not out.exists() and list(tmp_path.glob(".features*")) == []


class Stop(Exception):
    pass


def stop_after(k: int):
    """An `on_batch` that kills the run once k images are handled, as a SIGTERM between batches would."""
    def on_batch(handled, total):
        if handled >= k:
            raise Stop
    return on_batch


def test_interrupted_run_resumes_without_duplicates(dataset, reference, tmp_path):
    out = tmp_path / "features"
    with pytest.raises(Stop):
        extraction.extract_dataset(dataset, out, PARAMS, on_batch=stop_after(3))
    shard = extraction.shard_dir(out, 0)
    assert shard_ids(shard) == [r.image_id for r in records_of(dataset)][:3] and not out.exists()
    seen = []
    outcome = extraction.extract_dataset(dataset, out, PARAMS, on_batch=lambda h, t: seen.append((h, t)))
    assert (outcome.resumed, outcome.written) == (3, 8)
    assert seen == [(3, 8), (6, 8), (8, 8)]  # starts at the resumed count, only two batches computed
    assert contents(out) == contents(reference)


def test_truncated_rows_are_dropped_and_recomputed(dataset, reference, tmp_path):
    """A kill in the middle of batch 2: features has row 5 and half of row 6, predictions stops at row 4."""
    out = tmp_path / "features"
    shard = extraction.shard_dir(out, 0)
    extraction.extract_shard(dataset, shard, PARAMS)
    feats, preds = shard / "features.tsv", shard / "predictions.tsv"
    f_off = [int(x) for x in (shard / "features.lineidx").read_text().split()]
    p_off = [int(x) for x in (shard / "predictions.lineidx").read_text().split()]
    feats.write_bytes(feats.read_bytes()[: f_off[5] + 40])  # rows 1-5 complete, row 6 cut mid-line
    preds.write_bytes(preds.read_bytes()[: p_off[4]])  # rows 1-4
    outcome = extraction.extract_dataset(dataset, out, PARAMS)
    assert (outcome.resumed, outcome.written) == (4, 8)
    assert contents(out) == contents(reference)


def test_resume_recovers_offsets_across_scan_chunks(dataset, tmp_path, monkeypatch):
    shard = tmp_path / "rank-000"
    extraction.extract_shard(dataset, shard, PARAMS)
    expected = (shard / "features.lineidx").read_bytes()
    (shard / "features.lineidx").write_text("garbage\n")  # derived from the TSV on every open
    monkeypatch.setattr(extraction, "SCAN_CHUNK", 7)  # newlines fall on every kind of chunk boundary
    with extraction.ShardWriter(shard, json.loads((shard / "shard.json").read_text())) as w:
        assert len(w.done) == 8
    assert (shard / "features.lineidx").read_bytes() == expected


def test_shard_of_other_settings_is_discarded(dataset, reference, tmp_path):
    out = tmp_path / "features"
    with pytest.raises(Stop):
        extraction.extract_dataset(dataset, out, Params(seed=5, features=PARAMS.features), on_batch=stop_after(3))
    outcome = extraction.extract_dataset(dataset, out, PARAMS)
    assert outcome.discarded_stale and outcome.resumed == 0
    assert contents(out) == contents(reference)


@pytest.fixture
def broken(tmp_path):
    root = tmp_path / "dataset"
    synthetic_data.write_dataset(root, DataConfig(n_train=4, n_val=2, n_test=2), seed=0)
    victim = records_of(root)[4]  # the middle of batch 2
    (root / victim.file_name).write_bytes(b"this is not a PNG" * 10)
    return root, victim


def test_unreadable_image_is_recorded_and_the_rest_extracts(broken, reference, tmp_path):
    root, victim = broken
    out = tmp_path / "features"
    outcome = extraction.extract_dataset(root, out, PARAMS, on_error="record")
    assert outcome.written == 7 and [f["image_id"] for f in outcome.failures] == [victim.image_id]
    assert sorted(contents(out)) == sorted(NAMES + ["failures.json"])
    failures = json.loads((out / "failures.json").read_text())
    assert len(failures) == 1 and failures[0]["image_id"] == victim.image_id
    assert failures[0]["file"] == victim.file_name and "cannot decode image" in failures[0]["message"]
    got, ref = RegionFeatures(out), RegionFeatures(reference)
    others = [r.image_id for r in records_of(root) if r.image_id != victim.image_id]
    assert got.image_ids == others
    batch2 = {r.image_id for r in records_of(root)[3:6]}
    for image_id in others:
        feats, tags = got[image_id]
        want, want_tags = ref[image_id]
        assert tags == want_tags
        if image_id in batch2:  # one image fewer in the batch: equal up to float32 reassociation
            np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(feats, want)


def test_unreadable_image_fails_by_default(broken, tmp_path):
    root, victim = broken
    out = tmp_path / "features"
    with pytest.raises(PipelineError, match=rf"{victim.file_name}: cannot decode image .*image id {victim.image_id}"):
        extraction.extract_dataset(root, out, PARAMS)
    assert not out.exists()
    assert shard_ids(extraction.shard_dir(out, 0)) == [r.image_id for r in records_of(root)][:3]  # kept to resume


def test_workers_give_identical_bytes(dataset, reference, tmp_path):
    extraction.extract_dataset(dataset, tmp_path / "w2", PARAMS, num_workers=2)
    assert contents(tmp_path / "w2") == contents(reference)


def test_precision_modes(dataset, tmp_path):
    plan = extraction.plan_dataset(dataset, PARAMS)
    torch.backends.cuda.matmul.allow_tf32 = True
    extraction.extract_shard(dataset, tmp_path / "fp32", PARAMS, plan=plan)
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    extraction.extract_shard(dataset, tmp_path / "bf16", PARAMS, plan=plan, precision="bf16")
    for row32, row16 in zip(TSVFile(tmp_path / "fp32" / "features.tsv"), TSVFile(tmp_path / "bf16" / "features.tsv")):
        a, b = (np.frombuffer(base64.b64decode(r[2]), "<f4") for r in (row32, row16))
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        assert not np.array_equal(a, b)  # autocast really ran in bf16 ...
        assert np.linalg.norm(a - b) < 0.05 * np.linalg.norm(a)  # ... and stayed close
    with pytest.raises(PipelineError, match="precision 'fp8'"):
        extraction.extract_shard(dataset, tmp_path / "x", PARAMS, plan=plan, precision="fp8")


def test_rank_from_torchrun_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert extraction.resolve_rank() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert extraction.resolve_rank() == (2, 4)
    assert extraction.resolve_rank(1, 2) == (1, 2)
    with pytest.raises(PipelineError, match=r"rank 4 with world size 4"):
        extraction.resolve_rank(4)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(PipelineError, match=r"RANK='x'"):
        extraction.resolve_rank()


# ---------------------------------------------------------------------------------------------------
# The stage


def write_params(path) -> str:
    path.write_text(yaml.safe_dump({"features": {"batch_size": 3}}))
    return str(path)


def test_stage_default_command_line_output_is_unchanged(dataset, reference, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "features"
    assert stage.main(["--params", write_params(tmp_path / "p.yaml"), "--data", str(dataset), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "8 images in" in captured.out and "images/s" in captured.out
    assert captured.err == ""  # no progress bar when stderr is not a terminal
    assert contents(out) == contents(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features", "p.yaml"]


def test_stage_ranks_then_merge(dataset, reference, tmp_path, capsys, monkeypatch):
    params = write_params(tmp_path / "p.yaml")
    out = tmp_path / "features"
    common = ["--params", params, "--data", str(dataset), "--out", str(out), "--no-progress"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert stage.main(common + ["--num-workers", "1"]) == 0
        assert f"rank {rank} of 2 done" in capsys.readouterr().out
    assert not out.exists()
    assert stage.main(common + ["--merge"]) == 0
    assert "merged 2 shards, 8 images" in capsys.readouterr().out
    assert contents(out) == contents(reference) and not extraction.shard_root(out).exists()


def test_stage_on_error_record_names_the_image(broken, tmp_path, capsys):
    root, victim = broken
    out = tmp_path / "features"
    args = ["--params", write_params(tmp_path / "p.yaml"), "--data", str(root), "--out", str(out)]
    assert stage.main(args + ["--on-error", "record"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: 1 images could not be read") and victim.file_name in err
    assert json.loads((out / "failures.json").read_text())[0]["image_id"] == victim.image_id


def test_stage_bad_rank_is_one_error_line(dataset, tmp_path, capsys):
    code = stage.main(["--params", write_params(tmp_path / "p.yaml"), "--data", str(dataset),
                       "--out", str(tmp_path / "f"), "--rank", "2", "--world-size", "2"])
    err = capsys.readouterr().err
    assert code == 1 and err == "error: rank 2 with world size 2: need world size >= 1 and 0 <= rank < world size\n"


# ---------------------------------------------------------------------------------------------------
# Detection mode: the VinVL detector (a tiny configuration of it) through the same driver and writer

DETECT = Params(features=replace(FeaturesConfig(), mode="detect", batch_size=3, min_size=96, max_size=160,
                                 detector=replace(FeaturesConfig().detector, num_classes=8, num_attributes=6)))


def test_detection_mode_writes_files_the_reader_and_training_read(dataset, tmp_path):
    out = tmp_path / "features"
    outcome = extraction.extract_dataset(dataset, out, DETECT)
    assert outcome.written == 8
    det = DETECT.features.detector
    regions = RegionFeatures(out, expected_dim=F.region_dim(DETECT.features))
    for image_id in regions.image_ids:
        feats, tags = regions[image_id]
        assert det.min_detections <= len(feats) <= det.max_detections
        assert all(t.startswith("class_") for t in tags)  # numbered names without a label map file
        assert (feats[:, :-6] >= 0).all()  # post-ReLU means
    predictions = [json.loads(row[1]) for row in TSVFile(out / "predictions.tsv")]
    objects = predictions[0]["objects"]
    confs = [o["conf"] for o in objects]
    assert confs == sorted(confs, reverse=True)
    assert all("attributes" in o and len(o["attributes"]) == len(o["attr_scores"]) for o in objects)
    # two shards merged equal the single-process run here too
    order = [r.image_id for r in records_of(dataset)]
    dirs = [extraction.shard_dir(tmp_path / "sharded", r) for r in range(2)]
    for rank, d in enumerate(dirs):
        extraction.extract_shard(dataset, d, DETECT, rank=rank, world_size=2)
    extraction.merge_shards(dirs, tmp_path / "sharded", order)
    assert contents(tmp_path / "sharded") == contents(out)


def test_given_box_predictions_carry_no_attribute_fields(reference):
    objects = json.loads(TSVFile(reference / "predictions.tsv")[0][1])["objects"]
    assert set(objects[0]) == {"rect", "class", "conf"}
