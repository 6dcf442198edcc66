import pytest
import torch

from aladin.backbone import load_backbone, read_state_dict, write_initial_checkpoint
from aladin.config import BackboneConfig
from aladin.io import PipelineError

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
