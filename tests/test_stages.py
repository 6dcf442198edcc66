"""Stages called as functions on a micro dataset: bad input stops them with one named error, no output."""
import json
import shutil

import pytest
import yaml
from micro import micro_world

from aladin.data import load_karpathy
from aladin.data import SINGLE_1K_FILE, read_img_keys
from stages import evaluate as evaluate_stage
from stages import features as features_stage
from stages import train_alignment, train_distill

MICRO = {
    "data": {"n_train": 12, "n_val": 6, "n_test": 6, "image_size": 64, "single_1k_size": 3},
    "backbone": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
    "features": {"min_size": 64, "max_size": 112},
    "model": {"matching_ff": 16},
    "train_alignment": {"epochs": 1, "batch_size": 8},
    "distill": {"epochs": 1, "batch_size": 8},
    "eval": {"fold_size": 3, "latency_queries": 2, "qualitative_queries": 2},
}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    micro_world(root, MICRO)
    return root


def one_error_line(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


def train_args(root, params, out):
    return ["--params", str(params), "--dataset", str(root / "dataset"), "--features", str(root / "features"),
            "--backbone", str(root / "backbone"), "--out", str(out), "--live", str(out) + "_live"]


@pytest.fixture(scope="module")
def trained(micro, tmp_path_factory):
    """Stage 1 and stage 2 run in process on the micro dataset: the folder holding align/ and distill/."""
    root = tmp_path_factory.mktemp("trained")
    p = micro / "params.yaml"
    assert train_alignment.main(train_args(micro, p, root / "align")) == 0
    assert train_distill.main(["--params", str(p), "--dataset", str(micro / "dataset"), "--features",
                               str(micro / "features"), "--teacher", str(root / "align"), "--out",
                               str(root / "distill"), "--live", str(root / "dl")]) == 0
    return root


def evaluate_args(micro, trained, out, dataset=None):
    return ["--params", str(micro / "params.yaml"), "--dataset", str(dataset or micro / "dataset"), "--features",
            str(micro / "features"), "--model", str(trained / "distill"), "--metrics", str(out / "m.json"),
            "--latency", str(out / "l.json"), "--qualitative", str(out / "q.json")]


def test_stages_run_end_to_end_in_process(micro, trained, tmp_path, capsys):
    assert evaluate_stage.main(evaluate_args(micro, trained, tmp_path)) == 0
    assert (tmp_path / "m.json").is_file() and (trained / "align" / "model.safetensors").is_file()
    # Three protocols: VinVL's single 1K analogue (the key file's images), the folds and the whole split.
    metrics = json.loads((tmp_path / "m.json").read_text())
    keys = read_img_keys(micro / "dataset" / SINGLE_1K_FILE)
    test_ids = [r.image_id for r in load_karpathy(micro / "dataset", "test")]
    assert len(keys) == 3 and set(keys) <= set(test_ids) and keys != test_ids[:3]  # not fold 0 (eval.fold_size 3)
    printed = capsys.readouterr().out
    assert (metrics["ensemble"], metrics["features"]) == (False, "VinVL layout, 256-d + 6 geometry, extracted here "
                                                                 "(given_boxes)")  # PEERS.md 8.7
    for head in ("matching", "alignment", "rerank@10"):
        single, folds = metrics[head]["vinvl_1k"], metrics[head]["coco_1k_5fold"]
        assert set(metrics[head]) == {"vinvl_1k", "coco_1k_5fold", "coco_5k"}
        assert (single["protocol"], single["head"], single["n_images"], single["n_captions"], single["n_folds"]) \
            == ("vinvl_1k", head, 3, 15, 1)
        assert single["keys_file"] == str(micro / "dataset" / SINGLE_1K_FILE)
        assert {"chance", "ndcg_rougeL_i2t", "ndcg_rougeL_t2i", "ndcg_spice"} <= set(single)
        assert single["rsum"] == pytest.approx(sum(single[d][f"r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
        assert f"{head:11s} rsum {single['rsum']:6.1f} (single 3)  {folds['rsum']:6.1f} (folds of 3)" in printed
    # ... so the single set's numbers are its own, not fold 0's again (the point of keeping both protocols)
    assert any(metrics[h]["vinvl_1k"]["rsum"] != metrics[h]["coco_1k_5fold"]["folds"]["0"]["rsum"] for h in metrics
               if isinstance(metrics[h], dict))
    # The hinge (triplet) alternative to ListNet trains the same head from the same teacher.
    params = yaml.safe_load((micro / "params.yaml").read_text())
    params["distill"]["losses"] = ["matching"]
    (tmp_path / "triplet.yaml").write_text(yaml.safe_dump(params))
    assert train_distill.main(["--params", str(tmp_path / "triplet.yaml"), "--dataset", str(micro / "dataset"),
                               "--features", str(micro / "features"), "--teacher", str(trained / "align"),
                               "--out", str(tmp_path / "triplet"), "--live", str(tmp_path / "tl")]) == 0
    listnet_loss = json.loads((trained / "dl" / "metrics.json").read_text())["train"]["loss"]
    triplet_loss = json.loads((tmp_path / "tl" / "metrics.json").read_text())["train"]["loss"]
    assert listnet_loss != pytest.approx(triplet_loss)


def test_typo_in_params_stops_training_before_any_output(micro, tmp_path, capsys):
    params = yaml.safe_load((micro / "params.yaml").read_text())
    params["train_alignment"]["learning_rate"] = 1e-3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert train_alignment.main(train_args(micro, tmp_path / "params.yaml", tmp_path / "out")) == 1
    one_error_line(capsys, "unknown key 'train_alignment.learning_rate'")
    assert not (tmp_path / "out").exists()


def test_malformed_features_row_stops_training(micro, tmp_path, capsys):
    broken = tmp_path / "features"
    shutil.copytree(micro / "features", broken)
    lines = (broken / "features.tsv").read_bytes().split(b"\n")
    cols = lines[2].split(b"\t")
    lines[2] = b"\t".join(cols[:2] + [cols[2][: len(cols[2]) // 2]])  # truncate the base64 of row 3
    (broken / "features.tsv").write_bytes(b"\n".join(lines))
    args = train_args(micro, micro / "params.yaml", tmp_path / "out")
    args[args.index("--features") + 1] = str(broken)
    assert train_alignment.main(args) == 1
    one_error_line(capsys, "features.tsv")
    assert not (tmp_path / "out").exists()


def test_missing_image_stops_feature_extraction(micro, tmp_path, capsys):
    dataset = tmp_path / "dataset"
    shutil.copytree(micro / "dataset", dataset)
    victim = sorted((dataset / "images").iterdir())[4]
    victim.unlink()
    assert features_stage.main(["--params", str(micro / "params.yaml"), "--data", str(dataset),
                                "--out", str(tmp_path / "features")]) == 1
    one_error_line(capsys, victim.name)
    assert not (tmp_path / "features").exists()


def test_feature_dimension_must_match_the_model(micro, tmp_path, capsys):
    params = yaml.safe_load((micro / "params.yaml").read_text())
    params["model"]["img_feature_dim"] = 100
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert train_alignment.main(train_args(micro, tmp_path / "params.yaml", tmp_path / "out")) == 1
    one_error_line(capsys, "model.img_feature_dim is 100")


def test_without_a_key_file_vinvl_1k_is_recorded_absent(micro, trained, tmp_path, capsys):
    dataset = tmp_path / "dataset"
    shutil.copytree(micro / "dataset", dataset)
    (dataset / SINGLE_1K_FILE).unlink()  # a COCO dataset built without downloads.vinvl_test_img_keys_1k
    assert evaluate_stage.main(evaluate_args(micro, trained, tmp_path, dataset)) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    for head in ("matching", "alignment", "rerank@10"):
        record = metrics[head]["vinvl_1k"]
        assert set(record) == {"protocol", "absent", "head"} and record["protocol"] == "vinvl_1k"
        assert record["absent"].startswith(f"{dataset / SINGLE_1K_FILE} does not exist")
        assert metrics[head]["coco_5k"]["n_images"] == 6
    assert "matching    rsum absent  " in capsys.readouterr().out


def test_a_key_outside_the_test_split_stops_evaluation(micro, trained, tmp_path, capsys):
    dataset = tmp_path / "dataset"
    shutil.copytree(micro / "dataset", dataset)
    keys = read_img_keys(dataset / SINGLE_1K_FILE)
    (dataset / SINGLE_1K_FILE).write_text(f"{keys[0]}\n5\n")  # image 5 is a training image
    assert evaluate_stage.main(evaluate_args(micro, trained, tmp_path, dataset)) == 1
    one_error_line(capsys, f"{dataset / SINGLE_1K_FILE}:2: image id 5 is not an image of the test split")
    assert not (tmp_path / "m.json").exists()
