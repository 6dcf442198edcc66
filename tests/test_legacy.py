"""Legacy files: the restricted unpickler, the released-checkpoint import, VinVL coco_ir readers.

The fixtures are written with torch.save from the formats described in ALADIN.md 6.2 and 10, at a tiny
size (hidden 16, 2 layers, 2 backbone heads).
"""
import argparse
import builtins
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from aladin.backbone import load_config, write_initial_checkpoint
from aladin.config import BackboneConfig, CompatConfig, ModelConfig
from aladin.data import read_img_keys
from aladin.io import PipelineError
from aladin.legacy import (convert, import_aladin_checkpoint, read_captions_pt, read_checkpoint,
                           safe_torch_load)
from aladin.model import Tokens
from aladin.train import WEIGHTS, load_model

CFG = BackboneConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
MODEL = ModelConfig(img_feature_dim=10, matching_layers=2, matching_heads=4, matching_ff=16)
COMPAT = CompatConfig()
HEAD = "img_txt_enc.final_projection_net."
OSCAR = "img_txt_enc.oscar_model."
# The original's YAML (alad/configs/alad-matching-distill-finetune.yaml), shrunk to the tiny size.
ALADIN_YAML = {"model": {"name": "teran", "embed-size": 16, "tern-layers": 2, "dropout": 0.1},
               "training": {"lr": 1e-5, "loss-type": "distillation", "alignment-mode": "MrSw"}}


def original_head() -> nn.TransformerEncoder:
    """The original's matching head: sequence-first, nhead=4, dim_feedforward = embed size."""
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=16, dropout=0.1)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def released_state(backbone_dir: Path, seed: int = 5) -> dict[str, torch.Tensor]:
    """Every key of the released scheme, with random values so that no tensor equals a default init."""
    g = torch.Generator().manual_seed(seed)
    oscar = torch.load(backbone_dir / "pytorch_model.bin", weights_only=True)  # bert.*, pooler, classifier
    state = {OSCAR + k: torch.randn(v.shape, generator=g) for k, v in oscar.items()}
    state.update({HEAD + k: torch.randn(v.shape, generator=g) for k, v in original_head().state_dict().items()})
    for name in ("img_proj", "cap_proj"):  # built by the original, never used
        state[f"img_txt_enc.{name}.weight"] = torch.randn(16, 16, generator=g)
        state[f"img_txt_enc.{name}.bias"] = torch.randn(16, generator=g)
    return state


def save_released(path: Path, state, config=ALADIN_YAML, **kwargs) -> Path:
    opt = argparse.Namespace(add_od_labels=True, od_label_type="vg", max_seq_length=50, max_img_seq_length=34,
                             img_layer_norm_eps=1e-12, device=torch.device("cpu"), eval_model_dir="ckpt/")
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "params": [0, 1]}]}
    torch.save({"epoch": 7, "model": state, "optimizer": optimizer, "scheduler": {"last_epoch": 7},
                "opt": opt, "config": config, "Eiters": 1234}, path, **kwargs)
    return path


@pytest.fixture()
def backbone(tmp_path):
    folder = tmp_path / "backbone"
    write_initial_checkpoint(folder, ["a", "red", "circle"], CFG, img_feature_dim=10, seed=3)
    return folder


@pytest.fixture()
def state(backbone):
    return released_state(backbone)


# ---------------------------------------------------------------------------------------------------
# Importing the released checkpoint


def test_every_key_is_mapped_and_tensors_are_equal(tmp_path, backbone, state):
    path = save_released(tmp_path / "model_best_rsum.pth.tar", state)
    model, opt = import_aladin_checkpoint(path, MODEL, COMPAT, backbone)
    ours = model.state_dict()
    for key, value in ours.items():
        if key.startswith("backbone."):
            original = OSCAR + "bert." + key.removeprefix("backbone.")
        else:
            original = HEAD + key.removeprefix("matching_head.encoder.")
        assert torch.equal(value, state[original]), key
    unused = [k for k in state if k.startswith(("img_txt_enc.img_proj", "img_txt_enc.cap_proj",
                                                OSCAR + "bert.pooler", OSCAR + "classifier"))]
    assert len(unused) == 8 and len(ours) + len(unused) == len(state)
    assert opt == {"add_od_labels": True, "od_label_type": "vg", "max_seq_length": 50, "max_img_seq_length": 34,
                   "img_layer_norm_eps": 1e-12, "device": "cpu", "eval_model_dir": "ckpt/"}


def test_matching_head_equals_the_original_sequence_first_encoder(tmp_path, backbone, state):
    path = save_released(tmp_path / "ckpt.pth.tar", state)
    model, _ = import_aladin_checkpoint(path, MODEL, COMPAT, backbone)
    reference = original_head()
    reference.load_state_dict({k.removeprefix(HEAD): v for k, v in state.items() if k.startswith(HEAD)})
    model.eval(), reference.eval()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))  # (N, L, H)
    lengths = torch.tensor([5, 3, 1])
    pad = torch.arange(5)[None, :] >= lengths[:, None]  # (N, L) True = pad
    with torch.no_grad():
        first = reference(x.transpose(0, 1), src_key_padding_mask=pad)[0]  # (N, H): position 0 of (L, N, H)
        expected = first / first.norm(dim=-1, keepdim=True)
        for is_image in (False, True):  # one shared head; Q5: no image CLS slot
            got = model.matching_head(Tokens(x, lengths), is_image=is_image)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_backbone_config_from_the_checkpoint_or_the_folder(tmp_path, backbone, state):
    path = save_released(tmp_path / "yaml_only.pth.tar", state)
    with pytest.raises(PipelineError, match="yaml_only.pth.tar: key 'config' has no BERT fields"):
        import_aladin_checkpoint(path, MODEL, COMPAT)
    bert = load_config(backbone).to_dict()
    path = save_released(tmp_path / "with_bert.pth.tar", state, config=bert)
    model, _ = import_aladin_checkpoint(path, MODEL, COMPAT)  # no folder needed
    assert model.backbone.config.hidden_size == 16 and model.backbone.LayerNorm is not None


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop(HEAD + "layers.1.norm2.bias"), f"missing keys: {HEAD}layers.1.norm2.bias"),
    (lambda s: s.pop(OSCAR + "bert.LayerNorm.weight"), f"missing keys: {OSCAR}bert.LayerNorm.weight"),
    (lambda s: s.__setitem__("img_txt_enc.extra.weight", torch.zeros(1)), "unexpected keys: img_txt_enc.extra.weight"),
    (lambda s: s.__setitem__(HEAD + "layers.2.linear1.weight", torch.zeros(16, 16)),
     f"unexpected keys: {HEAD}layers.2.linear1.weight"),
    (lambda s: s.__setitem__(HEAD + "layers.0.linear3.weight", torch.zeros(16, 16)),
     f"unexpected keys: {HEAD}layers.0.linear3.weight"),
    (lambda s: s.__setitem__(OSCAR + "bert.img_embedding.weight", torch.zeros(16, 11)),
     rf"wrong shapes: {OSCAR}bert.img_embedding.weight \(16, 11\) != \(16, 10\)"),
])
def test_missing_extra_and_misshaped_keys_are_named(tmp_path, backbone, state, edit, message):
    edit(state)
    path = save_released(tmp_path / "bad.pth.tar", state)
    with pytest.raises(PipelineError, match=message):
        import_aladin_checkpoint(path, MODEL, COMPAT, backbone)


@pytest.mark.parametrize("model_cfg, compat, message", [
    (ModelConfig(img_feature_dim=10, matching_layers=3, matching_heads=4, matching_ff=16), COMPAT,
     "config.model.tern-layers = 2, but params model.matching_layers = 3"),
    (ModelConfig(img_feature_dim=10, matching_layers=2, matching_heads=2, matching_ff=16), COMPAT,
     "nhead=4 .* model.matching_heads = 2"),
    (MODEL, CompatConfig(first_region_as_cls=False), "compat.first_region_as_cls: true"),
])
def test_params_that_cannot_hold_the_checkpoint_are_refused(tmp_path, backbone, state, model_cfg, compat, message):
    path = save_released(tmp_path / "ckpt.pth.tar", state)
    with pytest.raises(PipelineError, match=message):
        import_aladin_checkpoint(path, model_cfg, compat, backbone)


def test_convert_writes_our_format_deterministically(tmp_path, backbone, state):
    path = save_released(tmp_path / "ckpt.pth.tar", state)
    meta = convert(path, tmp_path / "out", MODEL, COMPAT, backbone)
    assert meta["epoch"] == 7 and meta["Eiters"] == 1234 and meta["opt"]["add_od_labels"] is True
    assert meta["config"] == ALADIN_YAML
    reloaded = load_model(tmp_path / "out", MODEL, COMPAT)
    imported, _ = import_aladin_checkpoint(path, MODEL, COMPAT, backbone)
    for key, value in imported.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert (tmp_path / "out" / "vocab.txt").read_bytes() == (backbone / "vocab.txt").read_bytes()
    convert(path, tmp_path / "again", MODEL, COMPAT, backbone)
    for name in (WEIGHTS, "config.json", "vocab.txt", "training.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


def test_convert_needs_a_vocabulary_and_leaves_nothing_on_error(tmp_path, backbone, state):
    path = save_released(tmp_path / "ckpt.pth.tar", state)
    (backbone / "vocab.txt").unlink()
    with pytest.raises(PipelineError, match="vocab.txt: file not found"):
        convert(path, tmp_path / "out", MODEL, COMPAT, backbone)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# The restricted unpickler


class Planted:
    """A class no loader allows; unpickling it would run __setstate__ and touch the canary."""

    canary: str = ""

    def __setstate__(self, state):
        Path(state["canary"]).touch()


class Reduce:
    """Pickles as a call `func(*args)`, the classic pickle exploit."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def planted(canary: Path):
    obj = Planted.__new__(Planted)
    obj.__dict__["canary"] = str(canary)
    return obj


@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("payload, refused", [
    (lambda c: Reduce(os.system, f"touch {c}"), r"(posix|os)\.system"),
    (lambda c: Reduce(builtins.eval, f"open({str(c)!r}, 'w').close()"), r"builtins\.eval"),
    (planted, r"test_legacy\.Planted"),
])
def test_refused_globals_are_named_and_never_run(tmp_path, zip_format, payload, refused):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pth.tar"
    torch.save({"model": {"w": torch.ones(2)}, "opt": argparse.Namespace(a=1), "x": payload(canary)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(PipelineError, match=rf"evil.pth.tar: refused to unpickle global.*{refused}"):
        safe_torch_load(path, {"argparse.Namespace"})
    assert not canary.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_allowed_globals_only(tmp_path, zip_format):
    path = tmp_path / "args.bin"
    torch.save({"opt": argparse.Namespace(lr=0.5), "t": torch.arange(3)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(PipelineError, match=r"args.bin: refused to unpickle global.*argparse\.Namespace"):
        safe_torch_load(path)
    loaded = safe_torch_load(path, {"argparse.Namespace"})
    assert loaded["opt"].lr == 0.5 and torch.equal(loaded["t"], torch.arange(3))


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(PipelineError, match="missing.pt: file not found"):
        safe_torch_load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(PipelineError, match="junk.pt: not a loadable torch file"):
        safe_torch_load(tmp_path / "junk.pt")


# ---------------------------------------------------------------------------------------------------
# VinVL coco_ir files


def test_captions_pt_with_lists_and_json_strings(tmp_path):
    path = tmp_path / "test_captions.pt"
    torch.save({391895: ["A man rides a bike.", "A cyclist."], 522418: json.dumps(["A woman cuts cake."])}, path)
    assert read_captions_pt(path) == {391895: ["A man rides a bike.", "A cyclist."], 522418: ["A woman cuts cake."]}


@pytest.mark.parametrize("content, message", [
    ({1: "[not json"}, "image 1: captions string is not valid JSON"),
    ({1: ["ok", 3]}, "image 1: expected a list of caption strings"),
    ({"abc": ["x"]}, "key 'abc' is not an integer image id"),
    (["a", "b"], "expected a dict image id -> captions, got list"),
])
def test_captions_pt_errors(tmp_path, content, message):
    path = tmp_path / "minival_captions.pt"
    torch.save(content, path)
    with pytest.raises(PipelineError, match=f"minival_captions.pt: {message}"):
        read_captions_pt(path)


def test_captions_pt_is_loaded_without_arbitrary_unpickling(tmp_path):
    canary = tmp_path / "canary"
    path = tmp_path / "train_captions.pt"
    torch.save({1: Reduce(os.system, f"touch {canary}")}, path)
    with pytest.raises(PipelineError, match="refused to unpickle"):
        read_captions_pt(path)
    assert not canary.exists()


def test_img_keys(tmp_path):
    path = tmp_path / "test_img_keys_1k.tsv"
    path.write_text("391895\n522418\n184613\n")
    assert read_img_keys(path) == [391895, 522418, 184613]


@pytest.mark.parametrize("text, message", [
    ("1\n2\n12a\n", r"test_img_keys.tsv:3: expected one integer image id, got '12a'"),
    ("1\n\n2\n", r"test_img_keys.tsv:2: expected one integer image id, got ''"),
    ("1\n2\n1\n", r"test_img_keys.tsv:3: image id 1 appears twice"),
])
def test_img_keys_bad_line(tmp_path, text, message):
    path = tmp_path / "test_img_keys.tsv"
    path.write_text(text)
    with pytest.raises(PipelineError, match=message):
        read_img_keys(path)


# ---------------------------------------------------------------------------------------------------
# The released checkpoint through the stages: import, then the normal evaluate stage


def test_released_checkpoint_is_evaluated_by_the_evaluate_stage(tmp_path, capsys):
    import yaml

    from stages import data as data_stage
    from stages import evaluate as evaluate_stage
    from stages import features as features_stage
    from stages import import_checkpoint

    params = yaml.safe_load(open("params.yaml"))
    for section, values in {
        "data": {"n_train": 4, "n_val": 4, "n_test": 6, "image_size": 64, "single_1k_size": 3},
        "backbone": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32},
        "features": {"min_size": 64, "max_size": 112},
        "model": {"matching_ff": 16, "matching_heads": 4},
        "eval": {"fold_size": 3, "latency_queries": 2, "qualitative_queries": 2},
    }.items():
        params[section].update(values)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    assert data_stage.main(["--params", str(p), "--out", str(tmp_path / "dataset"),
                            "--backbone-out", str(tmp_path / "backbone")]) == 0
    assert features_stage.main(["--params", str(p), "--data", str(tmp_path / "dataset"),
                                "--out", str(tmp_path / "features")]) == 0
    ckpt = save_released(tmp_path / "model_best_rsum.pth.tar", released_state(tmp_path / "backbone"))
    assert import_checkpoint.main(["--params", str(p), "--checkpoint", str(ckpt), "--backbone",
                                   str(tmp_path / "backbone"), "--out", str(tmp_path / "released")]) == 0
    evaluate = ["--params", str(p), "--dataset", str(tmp_path / "dataset"), "--features", str(tmp_path / "features"),
                "--model", str(tmp_path / "released"), "--latency", str(tmp_path / "lat.json"),
                "--qualitative", str(tmp_path / "q.json")]
    assert evaluate_stage.main(evaluate + ["--metrics", str(tmp_path / "m1.json")]) == 0
    metrics = json.loads((tmp_path / "m1.json").read_text())
    assert {"matching", "alignment"} <= set(metrics) and metrics["matching"]["coco_5k"]["rsum"] >= 0
    # The released weights are what gets evaluated: the imported model equals the checkpoint's tensors.
    model = load_model(tmp_path / "released", ModelConfig(**{**params["model"]}), CompatConfig(**params["compat"]))
    for ours, tensor in model.state_dict().items():
        theirs = (OSCAR + "bert." + ours.removeprefix("backbone.")) if ours.startswith("backbone.") else \
            HEAD + "layers." + ours.removeprefix("matching_head.encoder.layers.")
        assert theirs in ckpt_state(ckpt), theirs
        assert torch.equal(ckpt_state(ckpt)[theirs], tensor), ours
    # Same checkpoint, same metrics bytes.
    assert evaluate_stage.main(evaluate + ["--metrics", str(tmp_path / "m2.json")]) == 0
    assert (tmp_path / "m1.json").read_bytes() == (tmp_path / "m2.json").read_bytes()
    # A missing checkpoint is one named error and no output folder.
    capsys.readouterr()
    assert import_checkpoint.main(["--params", str(p), "--checkpoint", str(tmp_path / "nope.pth.tar"), "--backbone",
                                   str(tmp_path / "backbone"), "--out", str(tmp_path / "none")]) == 1
    assert "nope.pth.tar" in capsys.readouterr().err and not (tmp_path / "none").exists()


def ckpt_state(path: Path) -> dict:
    return read_checkpoint(path)["model"]
