"""The TERAN recipe (PEERS.md 3, 8 items 5 and 8): selection and MrSw against a naive loop, slot 0 and
padding never contributing, chunking, separate encoders, the truncated BERT, and a short training run."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aladin.backbone import load_backbone, load_tokenizer, write_initial_checkpoint
from aladin.config import BackboneConfig, ConfigError, _build
from aladin.io import PipelineError
from aladin.recipes.base import concat_reps
from aladin.recipes.teran import CONFIG, PAPER, Teran, TeranConfig, build
from aladin.scoring import alignment_scores, select_alignment_tokens
from aladin.tokenization import encode_captions, encode_images

WORDS = ["a", "red", "blue", "circle", "square", "left", "of", "star", "large", "small", "green", "big"]
CAPTIONS = ["a red circle left of a blue square", "a small star", "a large blue square left of a red star",
            "big green circle", "a star left of a small square"]
REGION_DIM = 10  # D; img_feature_dim = D + 6
FEATURE_DIM = REGION_DIM + 6
MAX_SEQ, MAX_REGIONS = 16, 5
SMALL = TeranConfig(d_img=16, region_layers=1, d_emb=16, joint_layers=1, heads=2, ffn=32, text_layers=2)


def region_rows(rng, n):
    """n rows of D feature values, then a valid VinVL geometry vector (x1/W, y1/H, x2/W, y2/H, w/W, h/H)."""
    corners = np.sort(rng.uniform(0, 1, (n, 2, 2)), axis=1)  # (n, [min, max], [x, y])
    x1, y1, x2, y2 = corners[:, 0, 0], corners[:, 0, 1], corners[:, 1, 0], corners[:, 1, 1]
    geometry = np.stack([x1, y1, x2, y2, x2 - x1, y2 - y1], axis=1)
    return np.concatenate([rng.standard_normal((n, REGION_DIM)), geometry], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teran") / "backbone"
    write_initial_checkpoint(folder, WORDS, BackboneConfig(hidden_size=16, num_attention_heads=2,
                                                           intermediate_size=32), img_feature_dim=FEATURE_DIM, seed=1)
    tok = load_tokenizer(folder)
    rng = np.random.default_rng(0)
    feats = [region_rows(rng, n) for n in (3, 2, 5, 4, 1)]  # region counts differ: padded slots exist
    texts = encode_captions(tok, CAPTIONS, MAX_SEQ)
    images = encode_images(tok, [["star"]] * len(feats), feats, MAX_SEQ, MAX_REGIONS)
    return folder, tok, texts, images


def recipe(world, cfg=SMALL, seed=0):
    return build(cfg, world[0], FEATURE_DIM, seed).eval()


def naive_mrsw(v_raw, img_len, w_raw, cap_len, zero_fill):
    """Regions 1..feat_len (slot 0 is CLS), words 1..cap_len-3, cosine, max over regions, sum over words."""
    widest = int(img_len.max())
    out = torch.zeros(len(v_raw), len(w_raw), dtype=torch.float64)
    for i in range(len(v_raw)):
        v = F.normalize(v_raw[i, 1: 1 + int(img_len[i])].double(), dim=-1)
        for j in range(len(w_raw)):
            w = F.normalize(w_raw[j, 1: int(cap_len[j]) - 2].double(), dim=-1)
            per_word = (v @ w.T).max(dim=0).values
            if zero_fill and len(v) < widest:  # a padded region slot scores 0 for every word
                per_word = per_word.clamp(min=0)
            out[i, j] = per_word.sum()
    return out


# ---------------------------------------------------------------------------------------------------
# PEERS.md 8 item 5: alignment


@pytest.mark.parametrize("zero_fill", [True, False])
def test_score_is_mrsw_of_selected_tokens(world, zero_fill):
    _, _, texts, images = world
    model = recipe(world, dataclasses.replace(SMALL, zero_fill=zero_fill))
    with torch.no_grad():
        v, v_len = model.image_tokens(images)
        w, w_len = model.text_tokens(texts)
        img, txt = model.encode_images(images), model.encode_texts(texts)
        scores = model.score(img, txt)
    # the shared scorer on the shared selection, bit for bit
    selected = select_alignment_tokens(v, v_len, w, w_len)
    assert torch.equal(scores, alignment_scores(*selected, mode="MrSw", zero_fill=zero_fill))
    torch.testing.assert_close(scores.double(), naive_mrsw(v, images.lengths, w, texts.lengths, zero_fill),
                               rtol=1e-5, atol=1e-5)


def test_masks_count_regions_and_cap_len_minus_3_words(world):
    _, _, texts, images = world
    model = recipe(world)
    with torch.no_grad():
        img, txt = model.encode_images(images), model.encode_texts(texts)
    assert img["tokens_mask"].dtype == torch.bool and txt["tokens_mask"].dtype == torch.bool
    assert torch.equal(img["tokens_mask"].sum(dim=1), images.lengths)  # every real region, no CLS slot
    assert torch.equal(txt["tokens_mask"].sum(dim=1), texts.lengths - 3)
    assert img["tokens"].shape == (5, int(images.lengths.max()), SMALL.d_emb)
    assert txt["tokens"].shape == (5, int(texts.lengths.max()) - 3, SMALL.d_emb)
    for reps in (img, txt):  # unit tokens
        norms = reps["tokens"].norm(dim=-1)[reps["tokens_mask"]]
        torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.parametrize("zero_fill", [True, False])
def test_slot0_and_padding_never_contribute(world, zero_fill):
    _, _, texts, images = world
    model = recipe(world, dataclasses.replace(SMALL, zero_fill=zero_fill))
    with torch.no_grad():
        txt = model.encode_texts(texts)
        before = model.score(model.encode_images(images), txt)
        slots = torch.arange(1 + int(images.lengths.max()))
        junk = (slots[None, :] == 0) | (slots[None, :] > images.lengths[:, None])  # CLS slot and padding

        def perturb(module, args, out):
            noise = 100.0 * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
            return torch.where(junk[:, :, None], out + noise, out)

        handle = model.img_joint_te.register_forward_hook(perturb)
        try:
            after = model.score(model.encode_images(images), txt)
            perturbed, _ = model.image_tokens(images)
        finally:
            handle.remove()
        clean, _ = model.image_tokens(images)
    assert not torch.equal(perturbed[:, 0], clean[:, 0])  # the hook did reach slot 0
    assert torch.equal(after, before)


def test_chunked_score_equals_unchunked(world):
    _, _, texts, images = world
    model = recipe(world)
    with torch.no_grad():
        img, txt = model.encode_images(images), model.encode_texts(texts)
        full = model.score(img, txt)
        for chunk in (1, 2, 3):
            torch.testing.assert_close(model.score(img, txt, chunk_size=chunk), full, rtol=1e-6, atol=1e-6)
    assert full.shape == (5, 5)


def test_losses_is_the_hinge_on_the_score_matrix(world):
    _, _, texts, images = world
    model = recipe(world)
    with torch.no_grad():
        img, txt = model.encode_images(images), model.encode_texts(texts)
        terms = model.losses(img, txt, epoch=0)
        s = model.score(img, txt).double()
    assert set(terms) == {"alignment"}
    d = s.diagonal()
    off = ~torch.eye(5, dtype=torch.bool)
    rows = ((0.2 + s - d[:, None]).clamp(min=0) * off).amax(dim=1).sum()  # hardest caption per image
    cols = ((0.2 + s - d[None, :]).clamp(min=0) * off).amax(dim=0).sum()  # hardest image per caption
    torch.testing.assert_close(terms["alignment"].double(), rows + cols, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Encoders


@pytest.mark.parametrize("shared_te", [False, True])
def test_encoders_never_mix_modalities_or_items(world, shared_te):
    _, _, texts, images = world
    model = recipe(world, dataclasses.replace(SMALL, shared_te=shared_te))
    assert (model.text_joint_te() is model.img_joint_te) == shared_te
    with torch.no_grad():
        img = model.encode_images(images)
        model.encode_texts(texts[:2])
        model.losses(img, model.encode_texts(texts), epoch=3)
        again = model.encode_images(images)
        # one item's reps do not depend on the other items of its batch (only on the padded width)
        parts = concat_reps([model.encode_images(images[i: i + 1]) for i in range(5)])
        txt_parts = concat_reps([model.encode_texts(texts[i: i + 1]) for i in range(5)])
        txt = model.encode_texts(texts)
    assert all(torch.equal(img[k], again[k]) for k in img)
    for whole, alone in ((img, parts), (txt, txt_parts)):
        assert torch.equal(whole["tokens_mask"], alone["tokens_mask"])
        m = whole["tokens_mask"]
        torch.testing.assert_close(whole["tokens"][m], alone["tokens"][m], rtol=1e-5, atol=1e-6)


def test_no_grad_eval_matches_grad_eval(world):
    """The encoder-layer fast path (eval, no grad) stays off, so validation and training encode alike."""
    _, _, texts, images = world
    model = recipe(world)
    with torch.no_grad():
        img0, txt0 = model.encode_images(images), model.encode_texts(texts)
    img1, txt1 = model.encode_images(images), model.encode_texts(texts)
    assert img1["tokens"].requires_grad
    assert torch.equal(img0["tokens"], img1["tokens"].detach())
    assert torch.equal(txt0["tokens"], txt1["tokens"].detach())


def test_text_backbone_is_the_first_text_layers_of_the_folder(world):
    folder, _, texts, _ = world
    model = recipe(world, dataclasses.replace(SMALL, text_layers=1))
    full = load_backbone(folder).eval()
    assert len(model.text_backbone.encoder.layer) == 1 and len(full.encoder.layer) == 2
    assert not any(k.startswith("text_backbone.img_embedding") for k in model.state_dict())
    x = texts.trimmed()
    with torch.no_grad():
        ours = model.text_backbone.forward_text(x.input_ids, x.attention_mask)
        full.encoder.layer = full.encoder.layer[:1]
        ref = full.forward_text(x.input_ids, x.attention_mask)
    assert torch.equal(ours, ref)
    with pytest.raises(PipelineError, match="text_layers is 3.*only 2 layers"):
        build(dataclasses.replace(SMALL, text_layers=3), folder, FEATURE_DIM, 0)


def test_box_and_area_come_from_the_geometry_values(world):
    _, _, _, images = world
    model = recipe(world)
    seen = {}
    handle = model.box_mlp.register_forward_hook(lambda m, args, out: seen.update(args=args))
    with torch.no_grad():
        model.encode_images(images)
    handle.remove()
    f, boxes, area = seen["args"]
    x = images.trimmed().img_feats
    assert f.shape == (5, 1 + x.shape[1], REGION_DIM)
    assert not f[:, 0].any() and not boxes[:, 0].any() and not area[:, 0].any()  # the zero CLS slot
    assert torch.equal(f[:, 1:], x[..., :REGION_DIM])
    assert torch.equal(boxes[:, 1:], x[..., REGION_DIM: REGION_DIM + 4])
    manual = (x[..., REGION_DIM + 2] - x[..., REGION_DIM]) * (x[..., REGION_DIM + 3] - x[..., REGION_DIM + 1])
    torch.testing.assert_close(area[:, 1:], manual)


def test_wrong_feature_width_is_named(world):
    _, _, _, images = world
    model = build(SMALL, world[0], FEATURE_DIM + 1, 0)
    with pytest.raises(ValueError, match="16 values per region.*img_feature_dim 17"):
        model.encode_images(images)


# ---------------------------------------------------------------------------------------------------
# Config and build


def test_config_paper_values_and_validation():
    paper = TeranConfig(**PAPER)
    assert set(PAPER) == {f.name for f in dataclasses.fields(TeranConfig)}
    assert (paper.d_img, paper.region_layers, paper.d_emb, paper.joint_layers) == (2048, 4, 1024, 2)
    assert (paper.heads, paper.ffn, paper.text_layers) == (4, 2048, 6)
    assert (paper.lr, paper.lr_step, paper.epochs, paper.batch_size, paper.grad_clip) == (1e-5, 20, 30, 40, 2.0)
    assert CONFIG is TeranConfig and TeranConfig().loss_weights() == {"alignment": 1.0}
    # the params path aladin.peers uses
    assert _build(CONFIG, {"d_emb": 32, "shared_te": True}, "peers.teran", "params.yaml").d_emb == 32
    with pytest.raises(ConfigError, match="unknown key 'peers.teran.d_model'"):
        _build(CONFIG, {"d_model": 32}, "peers.teran", "params.yaml")
    with pytest.raises(ValueError, match="alignment_mode"):
        TeranConfig(alignment_mode="scan-sentences")
    with pytest.raises(ValueError, match="d_emb: 30 is not divisible by heads"):
        TeranConfig(d_emb=30, heads=4)
    assert Teran.name == "teran" and Teran.index_kind == "set"


def test_build_is_seeded_and_leaves_the_global_rng_alone(world):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = recipe(world, seed=7), recipe(world, seed=7), recipe(world, seed=8)
    assert torch.equal(torch.rand(3), expected)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["box_mlp.mlp.0.weight"], sc["box_mlp.mlp.0.weight"])
    assert all(torch.equal(sa[k], sc[k]) for k in sa if k.startswith("text_backbone."))  # from the folder


# ---------------------------------------------------------------------------------------------------
# PEERS.md 8 item 8: a short training run lowers the loss


def smoke_run(world, steps=80, batch=8, seed=0):
    folder, tok, _, _ = world
    rng = np.random.default_rng(seed)
    n = 2 * batch
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 8)))) for _ in range(n)]
    texts = encode_captions(tok, captions, MAX_SEQ)
    images = encode_images(tok, [[]] * n, [region_rows(rng, int(rng.integers(2, 6))) for _ in range(n)],
                           MAX_SEQ, MAX_REGIONS)
    model = build(SMALL, folder, FEATURE_DIM, seed).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(seed)  # dropout
    losses = []
    for step in range(steps):
        idx = slice((step % 2) * batch, (step % 2 + 1) * batch)
        loss = model.losses(model.encode_images(images[idx]), model.encode_texts(texts[idx]), epoch=0)["alignment"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), SMALL.grad_clip)
        opt.step()
        losses.append(loss.item())
    return losses


def test_smoke_training_lowers_the_loss_deterministically(world):
    losses = smoke_run(world)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    assert smoke_run(world, steps=10) == losses[:10]  # same seed, same bytes


@pytest.mark.parametrize("shared_te", [False, True])
def test_state_dict_round_trips_through_safetensors(world, tmp_path, shared_te):
    from safetensors.torch import load_file, save_file

    _, _, texts, images = world
    cfg = dataclasses.replace(SMALL, shared_te=shared_te)
    model = recipe(world, cfg, seed=3)
    keys = model.state_dict().keys()
    assert any(k.startswith("txt_joint_te.") for k in keys) != shared_te  # a shared stack is stored once
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    other = recipe(world, cfg, seed=4)
    other.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=True)
    with torch.no_grad():
        a = model.score(model.encode_images(images), model.encode_texts(texts))
        b = other.score(other.encode_images(images), other.encode_texts(texts))
    assert torch.equal(a, b)
