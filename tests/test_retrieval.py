"""Search with each head: top-k reading, percentiles, batched encoding, re-ranking, latency records."""
import numpy as np
import pytest
import torch

from aladin.backbone import load_backbone, load_tokenizer, write_initial_checkpoint
from aladin.config import BackboneConfig, CompatConfig, ModelConfig
from aladin.data import ImageRecord
from aladin.model import Aladin
from aladin.retrieval import (encode_split, matching_similarities, measure_latency, percentile,
                              rerank_i2t, rerank_t2i, subset, top_images)
from aladin.splits import SplitInputs
from aladin.tokenization import encode_captions, encode_images


def test_top_images_reads_columns_of_an_images_by_captions_matrix():
    sims = torch.tensor([[0.1, 0.9, 0.3],
                         [0.8, 0.2, 0.4],
                         [0.5, 0.7, 0.6]])  # (3 images, 3 captions)
    assert top_images(sims, [0, 1], k=2) == [[1, 2], [0, 2]]
    assert top_images(sims, [2], k=10) == [[2, 1, 0]]  # k is capped at the gallery size


def test_percentile_is_the_nearest_rank_by_hand():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 0.5) == 3.0
    assert percentile(values, 0.95) == 5.0  # round(0.95 * 4) = 4 -> the largest
    assert percentile(values, 0.0) == 1.0


# ---------------------------------------------------------------------------------------------------
# Re-ranking on a tiny model

WORDS = ["a", "red", "blue", "circle", "square", "left", "of", "star", "large", "small"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("r") / "backbone"
    write_initial_checkpoint(folder, WORDS, BackboneConfig(hidden_size=16, num_attention_heads=2,
                                                           intermediate_size=32), img_feature_dim=12, seed=1)
    tok = load_tokenizer(folder)
    rng = np.random.default_rng(0)
    n_images, per = 7, 2
    tags = [list(rng.choice(WORDS, size=3)) for _ in range(n_images)]
    feats = [rng.standard_normal((int(rng.integers(2, 6)), 12)).astype(np.float32) for _ in range(n_images)]
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(n_images * per)]
    cfg = ModelConfig(max_seq_length=16, max_img_seq_length=5, img_feature_dim=12, matching_ff=16)
    split = SplitInputs([ImageRecord(i, f"{i}.png", ()) for i in range(n_images)],
                        encode_images(tok, tags, feats, cfg.max_seq_length, cfg.max_img_seq_length),
                        encode_captions(tok, captions, cfg.max_seq_length), captions,
                        torch.arange(n_images * per) // per)
    torch.manual_seed(0)
    model = Aladin(load_backbone(folder), cfg, CompatConfig(alignment_zero_fill=False)).eval()
    return model, split, encode_split(model, split, batch_size=3)


def test_encoding_in_batches_changes_nothing(tiny):
    model, split, enc = tiny
    whole = encode_split(model, split, batch_size=100)
    torch.testing.assert_close(enc.img_emb, whole.img_emb)
    torch.testing.assert_close(enc.txt_set.tokens[enc.txt_set.mask], whole.txt_set.tokens[whole.txt_set.mask])


@pytest.mark.parametrize("k", [3, 100])
def test_rerank_rescores_the_matching_shortlist(tiny, k):
    model, split, enc = tiny
    match = matching_similarities(enc)  # (N images, M captions)
    n, m = match.shape
    for c in range(m):
        q_set = subset(enc.txt_set, torch.tensor([c]))
        align = model.alignment_scores(enc.img_set, q_set)[:, 0].tolist()  # (N,) every image
        shortlist = sorted(range(n), key=lambda i: -float(match[i, c]))[:min(k, n)]
        expected = sorted(shortlist, key=lambda i: -align[i])[:5]
        got = rerank_t2i(model, enc.txt_emb[c: c + 1], q_set, enc, k, top_k=5, chunk_size=2)
        assert got.tolist() == expected
    for i in range(n):
        q_set = subset(enc.img_set, torch.tensor([i]))
        align = model.alignment_scores(q_set, enc.txt_set)[0].tolist()  # (M,)
        shortlist = sorted(range(m), key=lambda c: -float(match[i, c]))[:min(k, m)]
        expected = sorted(shortlist, key=lambda c: -align[c])[:5]
        assert rerank_i2t(model, enc.img_emb[i: i + 1], q_set, enc, k, top_k=5, chunk_size=4).tolist() == expected


def test_latency_covers_every_mode_and_direction(tiny):
    model, split, enc = tiny
    out = measure_latency(model, split, enc, n_queries=3, chunk_size=2, rerank_k=(2, 5))
    assert set(out) == {"matching", "alignment", "rerank@2", "rerank@5", "speedup"}
    for mode in ("matching", "alignment", "rerank@2", "rerank@5"):
        for direction in ("t2i", "i2t"):
            row = out[mode][direction]
            assert row["n_queries"] == 3
            assert 0 < row["encode_median_ms"] <= row["p95_ms"] and 0 < row["search_median_ms"] <= row["search_p95_ms"]
    only = measure_latency(model, split, enc, n_queries=2, chunk_size=2, directions=("t2i",))
    assert set(only) == {"matching", "alignment"} and set(only["matching"]) == {"t2i"}


def test_recall_metrics_add_rerank_modes_and_ndcg(tiny):
    from aladin.config import EvalConfig
    from aladin.evaluate import recall_metrics
    from aladin.evaluation import evaluate_protocol
    from aladin.ndcg import rouge_l_relevance

    model, split, enc = tiny
    metrics, sims = recall_metrics(model, split, enc, EvalConfig(fold_size=3, chunk_size=2), "synthetic")
    assert {"matching", "alignment", *(f"rerank@{k}" for k in EvalConfig().rerank_k)} <= set(metrics)
    relevance = rouge_l_relevance(split.captions, split.image_of_caption.numpy(), 7)
    for head in ("matching", "alignment"):
        expected = evaluate_protocol(sims[head], split.image_of_caption, relevance=relevance)
        assert metrics[head]["coco_5k"]["ndcg_rougeL_t2i"] == expected["ndcg_rougeL_t2i"]
        assert metrics[head]["coco_5k"]["ndcg_rougeL_i2t"] == expected["ndcg_rougeL_i2t"]
    # every k of the defaults is at least the 7-image gallery: re-ranking is the alignment head, t2i
    for k in EvalConfig().rerank_k:
        for protocol in ("coco_1k_5fold", "coco_5k"):
            record = metrics[f"rerank@{k}"][protocol]
            assert record["head"] == f"rerank@{k}" and record["rerank_k"] == k
            assert record["t2i"] == metrics["alignment"][protocol]["t2i"]
