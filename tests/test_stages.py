"""Stages called as functions on a micro dataset: bad input stops them with one named error, no output."""
import json
import shutil

import pytest
import yaml
from micro import micro_world

from stages import evaluate as evaluate_stage
from stages import features as features_stage
from stages import train_alignment, train_distill

MICRO = {
    "data": {"n_train": 12, "n_val": 6, "n_test": 6, "image_size": 64},
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


def test_stages_run_end_to_end_in_process(micro, tmp_path):
    p = micro / "params.yaml"
    assert train_alignment.main(train_args(micro, p, tmp_path / "align")) == 0
    assert train_distill.main(["--params", str(p), "--dataset", str(micro / "dataset"), "--features",
                               str(micro / "features"), "--teacher", str(tmp_path / "align"), "--out",
                               str(tmp_path / "distill"), "--live", str(tmp_path / "dl")]) == 0
    assert evaluate_stage.main(["--params", str(p), "--dataset", str(micro / "dataset"), "--features",
                                str(micro / "features"), "--model", str(tmp_path / "distill"), "--metrics",
                                str(tmp_path / "m.json"), "--latency", str(tmp_path / "l.json"),
                                "--qualitative", str(tmp_path / "q.json")]) == 0
    assert (tmp_path / "m.json").is_file() and (tmp_path / "align" / "model.safetensors").is_file()
    # The hinge (triplet) alternative to ListNet trains the same head from the same teacher.
    params = yaml.safe_load(p.read_text())
    params["distill"]["losses"] = ["matching"]
    (tmp_path / "triplet.yaml").write_text(yaml.safe_dump(params))
    assert train_distill.main(["--params", str(tmp_path / "triplet.yaml"), "--dataset", str(micro / "dataset"),
                               "--features", str(micro / "features"), "--teacher", str(tmp_path / "align"),
                               "--out", str(tmp_path / "triplet"), "--live", str(tmp_path / "tl")]) == 0
    listnet_loss = json.loads((tmp_path / "dl" / "metrics.json").read_text())["train"]["loss"]
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
