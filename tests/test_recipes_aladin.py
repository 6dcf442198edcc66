"""ALADIN's two heads as recipes (aladin.recipes.aladin_heads) give the pipeline's own numbers, bit for bit:
the same similarity matrices as aladin.retrieval, and the same metrics through the peers' evaluator."""
import pytest
import torch

from aladin.backbone import load_backbone, load_tokenizer
from aladin.config import load_params
from aladin.evaluate import recall_metrics, single_1k_subset
from aladin.model import Aladin
from aladin.peers import evaluate, similarities
from aladin.recipes.aladin_heads import AladinAlignment, AladinMatching
from aladin.regions import RegionFeatures
from aladin.retrieval import alignment_similarities, encode_split, matching_similarities
from aladin.splits import load_split
from micro import micro_world

MICRO = {
    "data": {"n_train": 6, "n_val": 4, "n_test": 7, "image_size": 64, "single_1k_size": 3},
    "backbone": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
    "features": {"min_size": 64, "max_size": 112},
    "model": {"matching_ff": 16},
    "eval": {"fold_size": 3, "batch_size": 3, "chunk_size": 2},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("aladin_recipes")
    cfg = load_params(micro_world(root, MICRO))
    torch.manual_seed(0)
    model = Aladin(load_backbone(root / "backbone"), cfg.model, cfg.compat).eval()  # untrained: numbers only
    features = RegionFeatures(root / "features", expected_dim=cfg.model.img_feature_dim)
    split = load_split(root / "dataset", features, "test", load_tokenizer(root / "backbone"), cfg.model, cfg.compat,
                       cfg.data.captions_per_image)
    return root, cfg, model, split


def test_heads_as_recipes_score_exactly_like_the_pipeline(world):
    root, cfg, model, split = world
    enc = encode_split(model, split, cfg.eval.batch_size)  # batches of 3: padding across batches is exercised
    assert torch.equal(similarities(AladinMatching(model), split, cfg.eval), matching_similarities(enc))
    assert torch.equal(similarities(AladinAlignment(model), split, cfg.eval),
                       alignment_similarities(model, enc, cfg.eval.chunk_size))
    assert (AladinMatching.index_kind, AladinAlignment.index_kind) == ("vector", "set")


def test_the_peers_evaluator_gives_aladins_metrics(world):
    root, cfg, model, split = world
    enc = encode_split(model, split, cfg.eval.batch_size)
    ours, _ = recall_metrics(model, split, enc, cfg.eval, "synthetic", single_1k_subset(root / "dataset", split))
    for recipe, head in ((AladinMatching(model), "matching"), (AladinAlignment(model), "alignment")):
        theirs, _ = evaluate(recipe, split, cfg.eval, root / "dataset", head, "synthetic")
        for protocol in ("vinvl_1k", "coco_1k_5fold", "coco_5k"):
            assert theirs[head][protocol] == ours[head][protocol], (head, protocol)


def test_the_heads_module_is_not_a_trainable_peer():
    from aladin.config import ConfigError, params_from_dict
    from aladin.peers import recipe_config

    with pytest.raises(ConfigError, match="unknown recipe 'aladin_heads'"):
        recipe_config(params_from_dict({"peers": {"recipes": ["aladin_heads"]}}), "aladin_heads")
