"""The paper profile and the six released recipes as params presets applied through `dvc exp run -S`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aladin.config import ConfigError, Params, as_dict, load_params, params_from_dict
from aladin.presets import apply, hydra_value, recipe_names, set_options, target_params

ROOT = Path(__file__).resolve().parents[1]
BASELINE = yaml.safe_load((ROOT / "params.yaml").read_text())

# ALADIN.md 4.1: loss-type, loss-weights, freeze-teran of the six released configs, as (stage 1, stage 2).
RELEASED = {
    "alignment-triplet": ((["alignment"], [1.0], False), None),
    "matching-triplet-finetune": ((["alignment"], [1.0], False), (["matching"], [1.0], True)),
    "matching-distill-finetune": ((["alignment"], [1.0], False), (["distillation"], [1.0], True)),
    "matching-triplet-e2e": ((["matching"], [1.0], False), None),
    "alignment-and-matching-distill": ((["alignment", "distillation"], [1.0, 1.0], False), None),
    "alignment-and-matching-triplet0.1-plus-distill":
        ((["alignment", "distillation", "matching"], [1.0, 1.0, 0.1], False), None),
}


def typed(params: Params) -> dict:
    """Every value as the stages read it: the peers' sections through their recipes' typed configs (`-S` writes
    1e-05, which PyYAML reads as a string, DVC_AND_NOTEBOOKS.md 3.2; the typed config coerces it)."""
    from aladin.peers import recipe_config

    out = as_dict(params)
    out["peers"]["sections"] = {name: as_dict(recipe_config(params, name)) for name in params.peers.sections}
    return out


def paper(recipe: str | None = None) -> Params:
    return params_from_dict(target_params(BASELINE, "paper", recipe))


def test_the_six_released_recipes_are_presets():
    assert sorted(recipe_names()) == sorted(RELEASED)
    for name, (stage1, stage2) in RELEASED.items():
        p = paper(name)
        assert (list(p.train_alignment.losses), list(p.train_alignment.loss_weights),
                p.train_alignment.freeze_backbone) == stage1, name
        if stage2 is None:
            assert p.distill.epochs == 0, name  # single-stage recipe: stage 2 passes the model through
        else:
            assert (list(p.distill.losses), list(p.distill.loss_weights), p.distill.freeze_backbone) == stage2
            assert p.distill.epochs == 20 and p.distill.lr_step == 10, name  # head-only recipes step at 10


def test_paper_profile_has_the_original_values():
    p = paper()
    assert (p.data.source, p.backbone.init, p.features.mode) == ("coco", "vinvl", "detect")
    assert (p.model.max_seq_length, p.model.max_img_seq_length, p.model.img_feature_dim) == (50, 34, 2054)
    assert (p.model.matching_layers, p.model.matching_heads, p.model.matching_ff) == (2, 4, 768)
    assert p.model.alignment_mode == "MrSw"
    for stage in (p.train_alignment, p.distill):
        assert (stage.lr, stage.batch_size, stage.epochs, stage.grad_clip, stage.margin) == (1e-5, 32, 20, 2.0, 0.2)
        assert stage.max_violation and stage.distillation_mode == "listnet" and stage.temperature == 6.0
        assert stage.precision == "fp32" and stage.lr_gamma == 0.1
    assert p.train_alignment.lr_step == 15
    assert as_dict(p.compat) == {"image_first_token": "unk", "first_region_as_cls": True, "drop_last_wordpiece": True,
                                 "alignment_zero_fill": True, "val_rsum_sum_heads": True,
                                 "frozen_backbone_dropout": True}
    assert tuple(p.features.blocks) == (3, 8, 36, 3) and p.features.groups == 32 and p.eval.fold_size == 1000


def test_paper_profile_gives_the_neighbours_their_papers_configurations():
    """PEERS.md 3.4 and 4.10, as the recipe modules record them in PAPER (except SelfAlign's own seed 1024:
    the pipeline's seed param seeds every recipe)."""
    import dataclasses

    from aladin.peers import recipe_config
    from aladin.recipes import selfalign, teran

    p = paper()
    for name, module in (("teran", teran), ("selfalign", selfalign)):
        cfg = recipe_config(p, name)
        fields = {f.name for f in dataclasses.fields(cfg)}
        assert set(module.PAPER) - fields <= {"seed"}, name
        for key in set(module.PAPER) & fields:
            assert getattr(cfg, key) == module.PAPER[key], (name, key)
    assert recipe_config(p, "teran").d_img == 2048 and recipe_config(p, "selfalign").views == 12


def test_presets_refuse_unknown_keys_and_names():
    with pytest.raises(ConfigError, match=r"x\.yaml: unknown key 'distill\.temprature'"):
        apply(BASELINE, {"distill.temprature": 4.0}, "x.yaml")
    with pytest.raises(ConfigError, match=r"unknown recipe 'alignment'"):
        target_params(BASELINE, "paper", "alignment")
    with pytest.raises(ConfigError, match=r"unknown profile 'papr'"):
        target_params(BASELINE, "papr", None)


def test_set_options_only_for_changed_leaves():
    current = apply(BASELINE, {"train_alignment.lr": "1e-05", "distill.epochs": 0}, "t")
    target = apply(BASELINE, {"train_alignment.lr": 1.0e-5}, "t")
    # '1e-05' (what an earlier -S leaves) equals 1e-5; distill.epochs goes back to the committed value.
    assert set_options(current, target) == ["-S", f"distill.epochs={BASELINE['distill']['epochs']}"]
    assert hydra_value(["alignment", "distillation"]) == "['alignment','distillation']"
    assert hydra_value("it's") == "'it\\'s'" and hydra_value(1e-5) == "1e-05" and hydra_value(False) == "false"


def test_dvc_exp_run_applies_a_recipe_exactly(tmp_path):
    """Through real DVC: the -S options give params.yaml that loads to the target, also from a workspace an
    earlier experiment left behind."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (repo / "show.py").write_text(
        "import json\nfrom aladin.config import as_dict, load_params\nfrom aladin.peers import recipe_config\n"
        "p = load_params('params.yaml')\nout = as_dict(p)\n"
        "out['peers']['sections'] = {n: as_dict(recipe_config(p, n)) for n in p.peers.sections}\n"
        "json.dump(out, open('out.json', 'w'))\n")  # the same view as typed() below
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"show": {
        "cmd": f"{sys.executable} show.py", "deps": ["show.py"], "outs": ["out.json"],
        "params": [k for k in BASELINE]}}}))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               DVC_NO_ANALYTICS="true", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")

    def sh(*cmd):
        result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    sh("git", "init", "-q")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    sh(sys.executable, "-m", "dvc", "repro", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "baseline")
    for recipe in ("alignment-and-matching-triplet0.1-plus-distill", "matching-triplet-finetune"):
        sh(sys.executable, "-m", "aladin.presets", "--profile", "paper", "--recipe", recipe, "--run")
        want = typed(paper(recipe))
        assert typed(load_params(repo / "params.yaml")) == want, recipe
        assert json.loads((repo / "out.json").read_text()) == json.loads(json.dumps(want))
    shown = sh(sys.executable, "-m", "dvc", "exp", "show", "--no-pager", "--csv")
    assert "paper-matching-triplet-finetune" in shown and "paper-alignment-and-matching-triplet0.1-plus-distill" in shown
