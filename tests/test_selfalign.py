"""SelfAlign recipe (PEERS.md section 4) against naive computations: the acceptance tests of PEERS.md 8
(items 1-4 and 8) on a tiny frozen backbone and random regions."""
import inspect
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aladin.backbone import load_tokenizer, write_initial_checkpoint
from aladin.config import BackboneConfig
from aladin.recipes.selfalign import (PAPER, SelfAlign, SelfAlignConfig, box6, build, context_nce, fixed_width,
                                      sinkhorn)
from aladin.tokenization import ImageInputs, TextInputs, encode_captions

WORDS = ["a", "red", "blue", "circle", "square", "left", "of", "star", "large", "small", "green", "on"]
REGION_DIM, MAX_REGIONS, MAX_WORDS = 12, 6, 12
FEATURE_DIM = REGION_DIM + 6
CFG = SelfAlignConfig(embed_size=32, views=3, heads=4, prototypes=16, conv_channels=(8, 4, 4, 4, 4, 4, 4),
                      max_words=MAX_WORDS, context_topk=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors here are tiny: with several threads on a busy 2-core machine the smoke run took 50 s, with one 3 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("selfalign") / "backbone"
    write_initial_checkpoint(folder, WORDS, BackboneConfig(hidden_size=16, num_attention_heads=2,
                                                           intermediate_size=32), img_feature_dim=FEATURE_DIM, seed=3)
    return folder


def random_images(n: int, rng: np.random.Generator) -> ImageInputs:
    """Regions with VinVL geometry of square images (x1/W, y1/H, x2/W, y2/H, w/W, h/H); 3..R per image."""
    lengths = rng.integers(3, MAX_REGIONS + 1, size=n)
    feats = np.zeros((n, MAX_REGIONS, FEATURE_DIM), dtype=np.float32)
    for i, m in enumerate(lengths):
        x1, y1 = rng.uniform(0, 0.5, (2, m))
        x2, y2 = x1 + rng.uniform(0.1, 0.5, m), y1 + rng.uniform(0.1, 0.5, m)
        feats[i, :m, :REGION_DIM] = rng.standard_normal((m, REGION_DIM))
        feats[i, :m, REGION_DIM:] = np.stack([x1, y1, x2, y2, x2 - x1, y2 - y1], axis=1)
    zeros = torch.zeros(n, 1, dtype=torch.long)
    return ImageInputs(zeros, zeros, torch.ones(n, 1 + MAX_REGIONS, dtype=torch.long), torch.from_numpy(feats),
                       torch.from_numpy(lengths))


def random_texts(tokenizer, n: int, rng: np.random.Generator):
    captions = [" ".join(rng.choice(WORDS, size=rng.integers(2, 8))) for _ in range(n)]
    return encode_captions(tokenizer, captions, 16)  # wider than max_words: fixed_width cuts to 12


def model_for(backbone_dir, cfg=CFG, seed=0) -> SelfAlign:
    return build(cfg, backbone_dir, FEATURE_DIM, seed)


def batch(backbone_dir, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return random_images(n, rng), random_texts(load_tokenizer(backbone_dir), n, rng)


# ---- 1. Sinkhorn -----------------------------------------------------------------------------------

def test_sinkhorn_rows_sum_to_one_and_follow_row_order():
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(40, 8, generator=g), dim=1) @ F.normalize(torch.randn(16, 8, generator=g), dim=1).t()
    q = sinkhorn(scores, eps=0.05, iters=2)  # [40, 16]
    torch.testing.assert_close(q.sum(dim=1), torch.ones(40), atol=1e-5, rtol=0)
    assert (q >= 0).all()
    perm = torch.randperm(40, generator=g)
    torch.testing.assert_close(sinkhorn(scores[perm], eps=0.05, iters=2), q[perm], atol=1e-6, rtol=1e-5)
    # naive transcription of the original (no max shift), on scores where exp(S / eps) stays finite
    ref = torch.exp(scores / 0.05).t()
    ref /= ref.sum()
    for _ in range(2):
        ref /= ref.sum(dim=1, keepdim=True); ref /= 16
        ref /= ref.sum(dim=0, keepdim=True); ref /= 40
    torch.testing.assert_close(q, (ref * 40).t(), atol=1e-6, rtol=1e-4)


# ---- 2. concept-level gradients --------------------------------------------------------------------

def _grad_is_zero(p):
    return p.grad is None or not p.grad.any()


@pytest.mark.parametrize("variant", ["camera", "lite"])
def test_concept_loss_reaches_only_text_projection_and_prototypes(backbone_dir, variant):
    cfg = replace(CFG, variant=variant)
    model = model_for(backbone_dir, cfg).train()
    images, texts = batch(backbone_dir)
    terms = model.losses(model.encode_images(images), model.encode_texts(texts), epoch=1)
    terms["concept"].backward()
    for name, p in model.named_parameters():
        if name.startswith(("text.mapping.", "concept.prototypes.")):
            assert not _grad_is_zero(p), name
        else:  # the whole image side, the rest of the text side, the frozen backbone
            assert _grad_is_zero(p), name
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(_grad_is_zero(p) for p in model.image.parameters())


def test_prototype_gradients_are_dropped_in_epoch_0_only(backbone_dir):
    images, texts = batch(backbone_dir)
    grads = {}
    for epoch in (0, 1):
        model = model_for(backbone_dir).train()
        model.losses(model.encode_images(images), model.encode_texts(texts), epoch=epoch)["concept"].backward()
        grads[epoch] = model.concept.prototypes.proj.weight.grad
        assert not _grad_is_zero(model.text.mapping.weight)
    assert grads[0] is None
    assert grads[1] is not None and grads[1].abs().sum() > 0
    # the rows are back on the unit sphere after every use
    torch.testing.assert_close(model.concept.prototypes.proj.weight.norm(dim=1), torch.ones(CFG.prototypes))


def test_concept_loss_equals_a_loop_over_words(backbone_dir):
    model = model_for(backbone_dir).train()
    images, texts = batch(backbone_dir)
    img, txt = model.encode_images(images), model.encode_texts(texts)
    got = model.losses(img, txt, epoch=1)["concept"]
    c = F.normalize(model.concept.prototypes.proj.weight.detach(), dim=1)
    mask, v, w = img["shallow_mask"], img["shallow"].detach(), txt["shallow"].detach()
    codes = sinkhorn(v[mask] @ c.t(), 0.05, 2)  # regions of the batch in row order
    offsets = np.cumsum([0] + mask.sum(dim=1).tolist())
    total = 0.0
    for b in range(len(images)):
        n_regions, n_words = int(mask[b].sum()), int(txt["lengths"][b])
        word_losses = []
        for t in range(n_words):
            r = int(torch.argmax(torch.stack([w[b, t] @ v[b, j] for j in range(n_regions)])))
            log_p = torch.log_softmax(c @ w[b, t] / 0.1, dim=0)
            word_losses.append(-(codes[offsets[b] + r] * log_p).sum())
        total += torch.stack(word_losses).mean()
    torch.testing.assert_close(got.detach(), total / len(images), atol=1e-5, rtol=1e-5)


# ---- 3. context term -------------------------------------------------------------------------------

def naive_infonce(queries, keys, temperature, k):
    """Per sample b, key i: -log(e^pos / (e^pos + sum of the k largest <m_b, l_{b', j}>/T over b' != b))."""
    b_count, n, _ = keys.shape
    losses = []
    for b in range(b_count):
        negatives = sorted((float(queries[b] @ keys[o, j]) / temperature
                            for o in range(b_count) if o != b for j in range(n)), reverse=True)[:k]
        for i in range(n):
            pos = float(queries[b] @ keys[b, i]) / temperature
            losses.append(-pos + math.log(math.exp(pos) + sum(math.exp(x) for x in negatives)))
    return sum(losses) / len(losses)


def test_context_nce_equals_naive_infonce_with_enough_negatives():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(20, 8, generator=g, dtype=torch.float64), dim=1)
    keys = F.normalize(torch.randn(20, 4, 8, generator=g, dtype=torch.float64), dim=2)
    got = context_nce(q, keys, temperature=0.7, topk=32)  # (B - 1) n = 76 >= 32: no -10 entry in the top-k
    assert float(got) == pytest.approx(naive_infonce(q, keys, 0.7, 32), rel=1e-12)
    # padded keys (text side with mask_text_padding): left out of positives and of every negative pool
    mask = torch.rand(20, 4, generator=g) > 0.3
    mask[:, 0] = True
    got = context_nce(q, keys, 0.7, 32, key_mask=mask)
    ragged = [keys[b, mask[b]] for b in range(20)]
    losses = []
    for b in range(20):
        negatives = sorted((float(q[b] @ x) / 0.7 for o in range(20) if o != b for x in ragged[o]), reverse=True)[:32]
        for x in ragged[b]:
            pos = float(q[b] @ x) / 0.7
            losses.append(-pos + math.log(math.exp(pos) + sum(math.exp(v) for v in negatives)))
    assert float(got) == pytest.approx(sum(losses) / len(losses), rel=1e-12)


def test_context_nce_small_batch_leaks_the_minus_10_entries():
    """B = 8, n = 4 keys, top-32: only (B - 1) n = 28 real negatives, so the sample's own 4 keys enter the
    top-k with logit -10. With every query and key equal (all logits 1/T): the released loss is
    log(29 + 4 e^(-10 - 1/T)) against the clean log 29, +1.50e-6 nats at T = 0.7; with top-30, two own
    entries leak: log(29 + 2 e^(-10 - 1/T)). Negligible in value, but the pool is not what the paper says."""
    t = 0.7
    u = F.normalize(torch.ones(8, dtype=torch.float64), dim=0)
    q, keys = u.expand(8, 8), u.expand(8, 4, 8)
    leak4 = float(context_nce(q, keys, t, topk=32))
    assert leak4 == pytest.approx(math.log(29 + 4 * math.exp(-10 - 1 / t)), rel=1e-14)
    assert leak4 - math.log(29) == pytest.approx(1.501e-6, rel=1e-3)
    assert float(context_nce(q, keys, t, topk=30)) == pytest.approx(math.log(29 + 2 * math.exp(-10 - 1 / t)), rel=1e-14)
    assert float(context_nce(q, keys, t, topk=32, self_value=-math.inf)) == pytest.approx(math.log(29), rel=1e-14)
    # the paper's k = 512 on 36 regions keeps the -10 entries out only from B = 16: (B - 1) 36 >= 512
    assert min(b for b in range(2, 40) if (b - 1) * 36 >= 512) == 16


# ---- 4. score decomposition ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["camera", "lite"])
def test_score_is_base_plus_half_cross_terms(backbone_dir, variant):
    cfg = replace(CFG, variant=variant)
    model = model_for(backbone_dir, cfg).train()
    images, texts = batch(backbone_dir, n=6)
    with torch.no_grad():
        img, txt = model.encode_images(images), model.encode_texts(texts)
        scores = model.score(img, txt)
        s_base = torch.einsum("ikd,td->itk", img["views"], txt["base_vector"]).amax(dim=-1)
        m = img["ctx_tokens_mask"][..., None].float()
        img_local = (img["ctx_tokens"] * m).sum(1) / m.sum(1)  # mean over real regions
        txt_local = txt["ctx_tokens"].mean(1)  # over all max_words positions, padding included (quirk)
        expected = s_base + 0.5 * img_local @ txt["ctx"].t() + 0.5 * img["ctx"] @ txt_local.t()
    assert img["vectors"].shape == (6, 1 if variant == "lite" else 3, 3 * cfg.embed_size)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.score(img, txt, chunk_size=4), scores, atol=1e-6, rtol=0)


# ---- encoders --------------------------------------------------------------------------------------

def test_encoders_take_one_modality_and_items_are_independent_in_eval(backbone_dir):
    for method in (SelfAlign.encode_images, SelfAlign.encode_texts):  # self and one batch of one modality
        assert len(inspect.signature(method).parameters) == 2
    model = model_for(backbone_dir).eval()
    images, texts = batch(backbone_dir, n=5)
    with torch.no_grad():
        img, txt = model.encode_images(images), model.encode_texts(texts)
        assert set(img) == {"vectors"} and set(txt) == {"vector"}
        for i in range(5):  # a gallery vector depends on its own item only: precomputable, kNN-indexable
            torch.testing.assert_close(model.encode_images(images[i:i + 1])["vectors"], img["vectors"][i:i + 1],
                                       atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(model.encode_texts(texts[i:i + 1])["vector"], txt["vector"][i:i + 1],
                                       atol=1e-5, rtol=1e-4)
        # padded region slots change nothing
        wider = ImageInputs(images.input_ids, images.token_type_ids, images.attention_mask,
                            F.pad(images.img_feats, (0, 0, 0, 3)), images.lengths)
        torch.testing.assert_close(model.encode_images(wider)["vectors"], img["vectors"], atol=1e-5, rtol=1e-4)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    model.train()
    assert not model.backbone.training


def test_fixed_width_cuts_to_sep_and_pads(backbone_dir):
    tok = load_tokenizer(backbone_dir)
    texts = encode_captions(tok, ["a red circle left of a blue square on a green star large", "a star"], 20)
    cut = fixed_width(texts, 8)
    assert cut.input_ids.shape == (2, 8) and cut.lengths.tolist() == [8, 4]
    assert cut.input_ids[0, -1] == tok.sep_token_id and cut.input_ids[0, :7].tolist() == texts.input_ids[0, :7].tolist()
    assert cut.input_ids[1].tolist() == texts.input_ids[1, :8].tolist()
    padded = fixed_width(texts, 24)
    assert padded.input_ids.shape == (2, 24) and padded.attention_mask[:, 20:].sum() == 0


def test_box_code_from_normalized_geometry():
    # a 100 x 50 box at (10, 20) in a 200 x 200 image: CAMERA's [x1/W, y1/H, w/W, h/H, w/h, wh/(WH)]
    geometry = torch.tensor([10 / 200, 20 / 200, 110 / 200, 70 / 200, 100 / 200, 50 / 200])
    torch.testing.assert_close(box6(geometry), torch.tensor([0.05, 0.1, 0.5, 0.25, 2.0, 5000 / 40000]))


def test_build_is_seeded_and_leaves_the_global_rng_alone(backbone_dir):
    state = torch.get_rng_state()
    a, b = model_for(backbone_dir, seed=5), model_for(backbone_dir, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert not torch.equal(model_for(backbone_dir, seed=6).image.fc.weight, a.image.fc.weight)


def test_config_checks_and_paper_values():
    paper = SelfAlignConfig.paper()
    assert (paper.embed_size, paper.views, paper.heads, paper.prototypes, paper.context_topk) == (2048, 12, 64, 1024, 512)
    assert sum(paper.conv_channels) == 1024 and paper.loss_weights() == {"rank": 1.0, "diversity": 0.01,
                                                                       "concept": 1.0, "context": 1.0}
    assert PAPER["sinkhorn_iters"] == 2 and PAPER["sinkhorn_eps"] == 0.05 and PAPER["max_words"] == 32
    assert PAPER["lr_step"] == 20 and paper.lr_step == 20 and paper.batch_size == 128
    for bad in ({"variant": "vsrn"}, {"heads": 5}, {"conv_kernels": (1, 3)}, {"context_topk": 0},
                {"sinkhorn_eps": 0.0}, {"dropout": 1.0}):
        with pytest.raises(ValueError, match="selfalign."):
            SelfAlignConfig(**bad)


# ---- 8. smoke run ----------------------------------------------------------------------------------

def to_device(images: ImageInputs, texts: TextInputs, device: str):
    return (ImageInputs(*(x.to(device) for x in (images.input_ids, images.token_type_ids, images.attention_mask,
                                                 images.img_feats, images.lengths))),
            TextInputs(*(x.to(device) for x in (texts.input_ids, texts.attention_mask, texts.lengths))))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["camera", "lite"])
def test_adam_steps_lower_every_loss_term(backbone_dir, variant, device):
    cfg = replace(CFG, variant=variant)
    model = model_for(backbone_dir, cfg).train().to(device)
    batches = [to_device(*batch(backbone_dir, n=16, seed=s), device) for s in (1, 2)]
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    history = []
    torch.manual_seed(0)
    for step in range(80):
        images, texts = batches[step % 2]
        terms = model.losses(model.encode_images(images), model.encode_texts(texts), epoch=1)
        total = sum(cfg.loss_weights()[k] * v for k, v in terms.items())
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.grad_clip)
        opt.step()
        history.append({k: float(v.detach()) for k, v in terms.items()})
    expected = {"rank", "concept", "context"} | ({"diversity"} if variant == "camera" else set())
    assert set(history[0]) == expected
    for name in expected:
        first = np.mean([h[name] for h in history[:10]])
        last = np.mean([h[name] for h in history[-10:]])
        assert last < first, f"{name}: {first:.4f} -> {last:.4f}"
