import json
import os
import pickle

import pytest
import torch
import yaml
from coco_fixture import checkpoint_files, serve
from loopback import server  # noqa: F401  (a fixture)
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForPreTraining, BertModel

from aladin import bert_init
from aladin.backbone import (SPECIAL_TOKENS, load_backbone, load_config, load_tokenizer, read_state_dict,
                             write_initial_checkpoint)
from aladin.config import BackboneConfig
from aladin.io import PipelineError
from stages import data as data_stage

CFG = BackboneConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


@pytest.fixture()
def checkpoint(tmp_path):
    folder = tmp_path / "backbone"
    write_initial_checkpoint(folder, ["a", "red", "circle"], CFG, img_feature_dim=10, seed=3)
    return folder


def test_checkpoint_uses_oscar_names_and_loads_every_tensor(checkpoint):
    state = read_state_dict(checkpoint)
    assert "bert.img_embedding.weight" in state and "bert.LayerNorm.weight" in state
    assert "bert.encoder.layer.1.attention.self.query.weight" in state
    assert "classifier.weight" in state and "bert.pooler.dense.weight" in state  # present, unused
    model = load_backbone(checkpoint)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[f"bert.{key}"]), key


def test_initial_checkpoint_is_deterministic(tmp_path, checkpoint):
    write_initial_checkpoint(tmp_path / "again", ["a", "red", "circle"], CFG, img_feature_dim=10, seed=3)
    for name in ("config.json", "vocab.txt"):
        assert (tmp_path / "again" / name).read_bytes() == (checkpoint / name).read_bytes()
    a, b = read_state_dict(checkpoint), read_state_dict(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("bert.img_embedding.bias"), "missing keys: bert.img_embedding.bias"),
    (lambda s: s.__setitem__("bert.extra.weight", torch.zeros(1)), "unexpected keys: bert.extra.weight"),
    (lambda s: s.__setitem__("bert.img_embedding.bias", torch.zeros(3)), r"wrong shapes: bert.img_embedding.bias \(3,\)"),
])
def test_checkpoint_mismatch_is_named(checkpoint, edit, message):
    state = read_state_dict(checkpoint)
    edit(state)
    torch.save(state, checkpoint / "pytorch_model.bin")
    with pytest.raises(PipelineError, match=message):
        load_backbone(checkpoint)


def test_module_prefix_of_data_parallel_checkpoints_is_stripped(checkpoint):
    state = {f"module.{k}": v for k, v in read_state_dict(checkpoint).items()}
    torch.save(state, checkpoint / "pytorch_model.bin")
    load_backbone(checkpoint)


def test_pickled_objects_are_refused(checkpoint):
    import argparse
    torch.save({"opt": argparse.Namespace(lr=1)}, checkpoint / "pytorch_model.bin")
    with pytest.raises(PipelineError, match="cannot be read as a plain tensor checkpoint"):
        load_backbone(checkpoint)


def test_padding_does_not_change_real_tokens(checkpoint):
    # The additive mask must hide padded positions: the same caption with more padding and garbage in the
    # padded slots gives the same outputs at its real positions.
    model = load_backbone(checkpoint).eval()
    ids = torch.tensor([[101, 104, 105, 102]])
    short = model.forward_text(ids, torch.ones_like(ids))
    padded_ids = torch.tensor([[101, 104, 105, 102, 104, 104]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    long = model.forward_text(padded_ids, mask)
    torch.testing.assert_close(long[:, :4], short)
    # Image branch: region tokens get no position embedding, so permuting regions permutes their outputs.
    feats = torch.randn(1, 3, 10, generator=torch.Generator().manual_seed(0))
    tag_ids = torch.tensor([[100, 104, 102]])
    types = torch.tensor([[0, 1, 1]])
    full = torch.ones(1, 6, dtype=torch.long)
    out = model.forward_image(tag_ids, types, full, feats)
    out_perm = model.forward_image(tag_ids, types, full, feats[:, [2, 0, 1]])
    torch.testing.assert_close(out_perm[:, 3:], out[:, 3:][:, [2, 0, 1]])
    torch.testing.assert_close(out_perm[:, :3], out[:, :3])


# ---------------------------------------------------------------------------------------------------
# backbone.init: vinvl and bert-base-uncased (aladin/bert_init.py), alone and through the data stage

WORDS = ["a", "red", "circle", "square", "left", "of"]


class _MakesFolder:
    """A pickle that creates a folder when loaded: proof that training_args.bin is never unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.fixture()
def vinvl(tmp_path):
    """A VinVL coco_ir folder: Oscar names (with pooler and classifier), config.json, vocab.txt, and a
    training_args.bin that would run code if it were unpickled."""
    folder = tmp_path / "coco_ir"
    write_initial_checkpoint(folder, WORDS, CFG, img_feature_dim=10, seed=4)
    (folder / "training_args.bin").write_bytes(pickle.dumps(_MakesFolder(tmp_path / "unpickled")))
    return folder


def _stage_params(tmp_path, backbone: dict, downloads: dict | None = None, img_feature_dim: int = 10):
    raw = {"seed": 2, "data": {"n_train": 3, "n_val": 2, "n_test": 2, "image_size": 48, "single_1k_size": 1},
           "backbone": backbone, "model": {"img_feature_dim": img_feature_dim}, "eval": {"fold_size": 2}}
    if downloads is not None:
        raw["downloads"] = downloads
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run_stage(params, tmp_path):
    return data_stage.main(["--params", str(params), "--out", str(tmp_path / "out" / "dataset"),
                            "--backbone-out", str(tmp_path / "out" / "backbone")])


def test_vinvl_backbone_from_path_is_checked_and_copied(vinvl, tmp_path, capsys):
    params = _stage_params(tmp_path, {"init": "vinvl", "path": str(vinvl)})
    assert _run_stage(params, tmp_path) == 0
    out = tmp_path / "out" / "backbone"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "pytorch_model.bin", "vocab.txt"]
    for name in ("config.json", "pytorch_model.bin", "vocab.txt"):
        assert (out / name).read_bytes() == (vinvl / name).read_bytes()
    assert not (tmp_path / "unpickled").exists()  # training_args.bin was neither read nor copied
    assert f"backbone (VinVL checkpoint from {vinvl} (2 layers, hidden 16)) in {out}" in capsys.readouterr().out


def test_vinvl_backbone_fetched_through_the_catalogue(vinvl, server, tmp_path):  # noqa: F811
    downloads = serve(server, checkpoint_files(vinvl, "vinvl"), tmp_path / "dl")
    assert _run_stage(_stage_params(tmp_path, {"init": "vinvl"}, downloads), tmp_path) == 0
    fetched = tmp_path / "dl" / "vinvl_backbone"
    assert sorted(p.name for p in fetched.iterdir() if not p.name.startswith(".")) == \
        ["config.json", "pytorch_model.bin", "vocab.txt"]
    a, b = read_state_dict(vinvl), read_state_dict(tmp_path / "out" / "backbone")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("edit, message", [
    (lambda folder: None, "img_feature_dim is 10, but params model.img_feature_dim is 12"),
    (lambda folder: torch.save(read_state_dict(folder) | {"bert.encoder.extra": torch.zeros(2)},
                               folder / "pytorch_model.bin"), "unexpected keys: bert.encoder.extra"),
])
def test_vinvl_backbone_errors_leave_no_output(vinvl, tmp_path, capsys, edit, message):
    edit(vinvl)
    dim = 12 if "12" in message else 10
    params = _stage_params(tmp_path, {"init": "vinvl", "path": str(vinvl)}, img_feature_dim=dim)
    (tmp_path / "out").mkdir()
    assert _run_stage(params, tmp_path) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert list((tmp_path / "out").iterdir()) == []  # neither the dataset nor the backbone


def test_random_init_refuses_a_path(tmp_path, capsys):
    assert _run_stage(_stage_params(tmp_path, {"init": "random", "path": "somewhere"}), tmp_path) == 1
    assert "backbone.path is 'somewhere' but backbone.init is random" in capsys.readouterr().err


def _hf_bert(folder, kind, seed=0):
    """A tiny real Hugging Face BERT saved with save_pretrained (safetensors), every weight random."""
    vocab = SPECIAL_TOKENS + WORDS
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=24, attn_implementation="eager")
    torch.manual_seed(seed)
    model = (BertModel if kind == "BertModel" else BertForPreTraining)(config).eval()
    with torch.no_grad():  # LayerNorms start at ones/zeros: randomise them too, so a swapped tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab))
    if kind != "BertModel":  # the extra keys of bert-base-uncased's config.json on the Hub
        raw = json.loads((folder / "config.json").read_text())
        raw |= {"architectures": ["BertForMaskedLM"], "gradient_checkpointing": False,
                "position_embedding_type": "absolute", "transformers_version": "4.6.0.dev0"}
        (folder / "config.json").write_text(json.dumps(raw))
    return model if kind == "BertModel" else model.bert


def _text_batch():
    ids = torch.tensor([[101, 104, 105, 106, 102, 0], [101, 107, 109, 102, 0, 0]])  # (2, 6), [PAD] = 0
    return ids, (ids != 0).long()


@pytest.mark.parametrize("kind", ["BertModel", "BertForPreTraining"])
def test_bert_base_uncased_conversion_matches_hugging_face(tmp_path, kind):
    src = tmp_path / "hf"
    reference = _hf_bert(src, kind)
    out = tmp_path / "oscar"
    out.mkdir()
    what = bert_init.convert_bert(src, out, BackboneConfig(), img_feature_dim=10, seed=7)
    if kind == "BertForPreTraining":
        assert what.endswith("unused: cls.predictions, cls.seq_relationship, pooler)")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    model = load_backbone(out).eval()
    ids, mask = _text_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        got = model.forward_text(ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)  # (7, 16) real tokens
    # The image input layers: BERT's initialiser from the seed; the config gains Oscar's image fields.
    state = load_file(out / "model.safetensors")
    w = state["bert.img_embedding.weight"]  # (16, 10)
    assert w.shape == (16, 10) and abs(w.std().item() - 0.02) < 0.006 and abs(w.mean().item()) < 0.006
    assert torch.equal(state["bert.img_embedding.bias"], torch.zeros(16))
    assert torch.equal(state["bert.LayerNorm.weight"], torch.ones(16))
    assert torch.equal(state["bert.LayerNorm.bias"], torch.zeros(16))
    config = load_config(out)
    assert (config.img_feature_dim, config.use_img_layernorm, config.img_layer_norm_eps) == (10, 1, 1e-12)
    assert load_tokenizer(out).convert_tokens_to_ids(["[UNK]", "red"]) == [100, 105]


def test_bert_conversion_is_deterministic_and_seeded(tmp_path):
    src = tmp_path / "hf"
    _hf_bert(src, "BertModel")
    outs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        (tmp_path / name).mkdir()
        bert_init.convert_bert(src, tmp_path / name, BackboneConfig(), img_feature_dim=10, seed=seed)
        outs.append({p.name: p.read_bytes() for p in (tmp_path / name).iterdir()})
    assert outs[0] == outs[1] and outs[0]["model.safetensors"] != outs[2]["model.safetensors"]


def test_original_gamma_beta_names_in_a_bin_file_are_mapped(tmp_path):
    src = tmp_path / "hf"
    reference = _hf_bert(src, "BertForPreTraining")
    state = load_file(src / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    assert sum(k.endswith(".gamma") for k in renamed) == 2 * 2 + 1 + 1  # 2 per layer, embeddings, cls transform
    (src / "model.safetensors").unlink()
    torch.save(renamed, src / "pytorch_model.bin")
    (tmp_path / "out").mkdir()
    bert_init.convert_bert(src, tmp_path / "out", BackboneConfig(), img_feature_dim=10, seed=0)
    ids, mask = _text_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = load_backbone(tmp_path / "out").eval().forward_text(ids, mask)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def test_bert_leftovers_and_vinvl_folders_are_refused(tmp_path, vinvl):
    src = tmp_path / "hf"
    _hf_bert(src, "BertModel")
    state = load_file(src / "model.safetensors")
    state["encoder.layer.0.attention.self.extra"] = torch.zeros(3)
    state["adapter.weight"] = torch.zeros(3)
    state.pop("encoder.layer.1.output.dense.bias")
    save_file(state, src / "model.safetensors")
    (tmp_path / "out").mkdir()
    with pytest.raises(PipelineError) as e:
        bert_init.convert_bert(src, tmp_path / "out", BackboneConfig(), img_feature_dim=10, seed=0)
    assert "missing keys: encoder.layer.1.output.dense.bias" in str(e.value)
    assert "unexpected keys: adapter.weight, encoder.layer.0.attention.self.extra" in str(e.value)
    with pytest.raises(PipelineError, match="has img_feature_dim, so this is an Oscar/VinVL checkpoint"):
        bert_init.convert_bert(vinvl, tmp_path / "out", BackboneConfig(), img_feature_dim=10, seed=0)


def test_bert_fallback_fetched_through_the_stage(tmp_path, server):  # noqa: F811
    src = tmp_path / "hf"
    reference = _hf_bert(src, "BertForPreTraining")
    downloads = serve(server, checkpoint_files(src, "bert-base-uncased"), tmp_path / "dl")
    assert _run_stage(_stage_params(tmp_path, {"init": "bert-base-uncased"}, downloads), tmp_path) == 0
    assert (tmp_path / "dl" / "bert-base-uncased" / "model.safetensors").read_bytes() == \
        (src / "model.safetensors").read_bytes()
    ids, mask = _text_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = load_backbone(tmp_path / "out" / "backbone").eval().forward_text(ids, mask)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)
