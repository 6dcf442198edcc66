import pytest
import yaml

from aladin.config import ConfigError, Params, load_params, params_from_dict


def test_repository_params_load_and_match_defaults_for_every_key():
    raw = yaml.safe_load(open("params.yaml"))
    params = load_params("params.yaml")
    assert params.distill.temperature == 6.0
    assert params.features.blocks == (1, 1, 1, 1)
    # Every key of params.yaml is a field (otherwise load_params would have raised); and every field of
    # Params appears in params.yaml, so DVC tracks every value a stage can read.
    assert set(raw) == set(Params.__dataclass_fields__)
    for section, values in raw.items():
        if isinstance(values, dict) and section != "peers":
            assert set(values) == set(type(getattr(params, section)).__dataclass_fields__), section
    # peers: every listed recipe has a section, and each section is typed by its recipe's own config
    from aladin.peers import recipe_config

    assert params.peers.recipes == ("teran", "selfalign") and set(raw["peers"]) == {"recipes", *params.peers.recipes}
    for name in params.peers.recipes:
        assert set(raw["peers"][name]) <= set(type(recipe_config(params, name)).__dataclass_fields__), name


def test_peer_sections_are_typed_by_their_recipes():
    from aladin.peers import recipe_config

    with pytest.raises(ConfigError, match=r"unknown recipe 'tern'"):
        params_from_dict({"peers": {"recipes": ["tern"]}})
    with pytest.raises(ConfigError, match=r"unknown key 'peers\.teran\.epoch'"):
        recipe_config(params_from_dict({"peers": {"teran": {"epoch": 3}}}), "teran")
    with pytest.raises(ConfigError, match=r"peers\.teran\.lr must be a number"):
        recipe_config(params_from_dict({"peers": {"teran": {"lr": "fast"}}}), "teran")
    assert recipe_config(params_from_dict({"peers": {"selfalign": {"views": 3}}}), "selfalign").views == 3


def test_unknown_key_is_rejected_with_its_dotted_name():
    with pytest.raises(ConfigError, match=r"unknown key 'distill\.temprature'"):
        params_from_dict({"distill": {"temprature": 4.0}})
    with pytest.raises(ConfigError, match=r"unknown key 'distil'"):
        params_from_dict({"distil": {}})
    with pytest.raises(ConfigError, match=r"unknown key 'features\.detector\.nms_filtr'"):
        params_from_dict({"features": {"detector": {"nms_filtr": 2}}})


def test_numbers_are_coerced_for_float_fields():
    # dvc exp run -S distill.temperature=4 writes an int; PyYAML reads 1e-05 as a string.
    p = params_from_dict({"distill": {"temperature": 4, "lr": "1e-05"}})
    assert p.distill.temperature == 4.0 and isinstance(p.distill.temperature, float)
    assert p.distill.lr == pytest.approx(1e-5)


@pytest.mark.parametrize("raw, message", [
    ({"distill": {"temperature": "hot"}}, r"distill\.temperature must be a number, got 'hot'"),
    ({"distill": {"temperature": -1.0}}, r"distill\.temperature must be positive"),
    ({"train_alignment": {"epochs": 2.5}}, r"train_alignment\.epochs must be an integer"),
    ({"compat": {"first_region_as_cls": "yes"}}, r"compat\.first_region_as_cls must be true or false"),
    ({"distill": {"distillation_mode": "kl"}}, r"distill\.distillation_mode must be one of"),
    ({"distill": {"losses": ["alignment"]}}, r"distill: the alignment loss trains only the backbone"),
    ({"train_alignment": {"losses": ["alignment", "ranking"], "loss_weights": [1, 1]}},
     r"train_alignment\.losses: unknown loss 'ranking'"),
    ({"train_alignment": {"losses": ["alignment", "distillation"]}},
     r"train_alignment\.loss_weights must have one weight per loss \(2\), got 1"),
    ({"downloads": {"karpathy_split": {"sha": "ab"}}}, r"unknown key 'downloads\.karpathy_split\.sha'"),
    ({"features": {"source": "vinvl_dump"}}, r"features\.dump_dir is empty"),
    ({"eval": {"fold_size": 10_000}}, r"eval\.fold_size \(10000\) is larger than the test split"),
    ({"features": {"blocks": 3}}, r"features\.blocks must be a list"),
    ({"model": "big"}, r"model must be a mapping"),
    ({"features": {"detector": {"nms_filter": 3}}}, r"features\.detector\.nms_filter must be one of \(1, 2\)"),
    ({"features": {"detector": {"min_detections": 50, "max_detections": 10}}}, r"min_detections <= "),
])
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        params_from_dict(raw)


def test_load_params_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("distill:\n  temprature: 2.0\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key 'distill\.temprature'"):
        load_params(path)
    path.write_text("distill: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)


def test_a_section_keeps_its_own_defaults_for_keys_it_omits():
    # Stage 1 and stage 2 share one dataclass with different defaults: a partial distill section must not
    # fall back to stage 1's (unfrozen backbone, alignment loss).
    p = params_from_dict({"distill": {"epochs": 1}, "downloads": {"coco_val2014": {"size": 5}}})
    assert p.distill.freeze_backbone and p.distill.losses == ("distillation",) and p.distill.epochs == 1
    assert not p.train_alignment.freeze_backbone and p.train_alignment.losses == ("alignment",)
    assert p.downloads.coco_val2014.size == 5 and p.downloads.coco_val2014.urls[0].endswith("val2014.zip")
