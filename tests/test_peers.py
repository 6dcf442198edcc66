"""ALADIN's neighbours through the pipeline's own stages: train_peer and evaluate_peer on a micro world.

The recipes' numerics are tested in test_teran.py and test_selfalign.py; here: the stages train on the
pipeline's pairs, keep the best validation epoch, and the evaluator's numbers are those of ALADIN's
evaluator on the recipe's own similarity matrix (same protocols, same split).
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aladin.backbone import load_tokenizer
from aladin.config import load_params
from aladin.evaluation import evaluate_protocol
from aladin.peers import build_recipe, similarities
from aladin.regions import RegionFeatures
from aladin.splits import load_split
from aladin.train import WEIGHTS
from micro import micro_world
from stages import evaluate_peer, train_peer

MICRO = {
    "data": {"n_train": 12, "n_val": 6, "n_test": 6, "image_size": 64, "single_1k_size": 3},
    "backbone": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
    "features": {"min_size": 64, "max_size": 112},
    "eval": {"fold_size": 3, "latency_queries": 2, "qualitative_queries": 2},
    "peers": {"teran": {"text_layers": 1, "d_img": 16, "d_emb": 16, "ffn": 32, "heads": 2, "epochs": 2,
                        "batch_size": 8},
              "selfalign": {"embed_size": 16, "views": 2, "heads": 2, "prototypes": 8, "context_topk": 8,
                            "epochs": 2, "batch_size": 8}},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    torch.set_num_threads(1)
    return root, micro_world(root, MICRO)


def _args(root, params, name):
    common = ["--params", str(params), "--recipe", name, "--dataset", str(root / "dataset"),
              "--features", str(root / "features"), "--backbone", str(root / "backbone")]
    train = common + ["--out", str(root / "models" / name), "--live", str(root / "live" / name)]
    evaluate = common + ["--model", str(root / "models" / name), "--metrics", str(root / "metrics" / f"{name}.json"),
                         "--latency", str(root / "metrics" / f"{name}.latency.json")]
    return train, evaluate


@pytest.mark.parametrize("name", ["teran", "selfalign"])
def test_train_and_evaluate_a_neighbour_with_aladins_evaluator(world, name, capsys):
    root, params = world
    train, evaluate = _args(root, params, name)
    assert train_peer.main(train) == 0
    meta = json.loads((root / "models" / name / "recipe.json").read_text())
    assert meta["recipe"] == name and meta["config"]["epochs"] == 2
    history = (root / "live" / name / "plots" / "metrics" / "val" / name / "rsum.tsv").read_text().splitlines()
    assert len(history) == 3  # header + one row per epoch
    best_rsum = max(float(line.split("\t")[-1]) for line in history[1:])
    assert meta["best"]["rsum"] == pytest.approx(best_rsum)  # the best validation epoch is the one kept

    assert evaluate_peer.main(evaluate) == 0
    record = json.loads((root / "metrics" / f"{name}.json").read_text())
    assert record["ensemble"] is False and record["features"].startswith("VinVL layout, 256-d + 6 geometry")
    metrics = record[name]
    assert set(metrics) == {"vinvl_1k", "coco_1k_5fold", "coco_5k"}
    folds = metrics["coco_1k_5fold"]
    assert folds["n_folds"] == 2 and folds["rsum"] == pytest.approx(np.mean([f["rsum"] for f in folds["folds"].values()]))
    assert metrics["vinvl_1k"]["n_images"] == 3 and metrics["vinvl_1k"]["protocol"] == "vinvl_1k"

    # The stage's numbers are the shared evaluator's on the saved model's similarity matrix.
    cfg = load_params(params)
    recipe, _ = build_recipe(cfg, name, root / "backbone")
    recipe.load_state_dict(load_file(str(root / "models" / name / WEIGHTS)))
    features = RegionFeatures(root / "features", expected_dim=cfg.model.img_feature_dim)
    test = load_split(root / "dataset", features, "test", load_tokenizer(root / "backbone"), cfg.model, cfg.compat,
                      cfg.data.captions_per_image)
    sims = similarities(recipe, test, cfg.eval).numpy()
    assert sims.shape == (6, 30)
    expected = evaluate_protocol(sims, test.image_of_caption)
    assert metrics["coco_5k"]["rsum"] == pytest.approx(expected["rsum"])
    assert metrics["coco_5k"]["t2i"] == pytest.approx(expected["t2i"])
    latency = json.loads((root / "metrics" / f"{name}.latency.json").read_text())[name]["t2i"]
    assert latency["median_ms"] > 0 and latency["index_kind"] == recipe.index_kind
    assert f"{name}: rsum" in capsys.readouterr().out


def test_a_mistyped_recipe_key_is_one_error_and_no_output(world, tmp_path, capsys):
    root, params = world
    bad = tmp_path / "params.yaml"
    bad.write_text(params.read_text().replace("  teran:\n", "  teran:\n    epoch: 3\n", 1))
    train, _ = _args(root, bad, "teran")
    train[train.index("--out") + 1] = str(tmp_path / "out")
    assert train_peer.main(train) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'peers.teran.epoch'" in err[0]
    assert not (tmp_path / "out").exists()
