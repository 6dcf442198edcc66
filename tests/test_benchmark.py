"""The benchmark's pieces against direct computations, and one micro run of the stage (no timing thresholds)."""
import json

import faiss
import numpy as np
import pytest
import torch

from aladin import benchmark as bm
from aladin.backbone import load_backbone, load_tokenizer, write_initial_checkpoint
from aladin.config import BackboneConfig, load_params
from aladin.crossencoder import CrossEncoder, joint_inputs, query_latency
from aladin.model import Aladin
from aladin.tokenization import encode_captions, encode_images
from aladin.train import save_model
from micro import micro_world
from stages import benchmark as benchmark_stage

WORDS = ["a", "red", "blue", "circle", "square", "left", "of", "star"]


def test_sweep_sizes():
    assert bm.sweep_sizes(500, 100_000) == [500, 5000, 50000, 100000]
    assert bm.sweep_sizes(500, 5000) == [500, 5000]
    assert bm.sweep_sizes(7, 7) == [7]
    with pytest.raises(ValueError):
        bm.sweep_sizes(10, 5)


def test_recall_at_k_by_hand():
    approx = np.array([[1, 2, 3], [4, 5, -1]])
    exact = np.array([[3, 2, 9], [4, 6, 7]])
    # query 0 finds 2 of {3, 2, 9}, query 1 finds 1 of {4, 6, 7} (-1 = no result): (2/3 + 1/3) / 2
    assert bm.recall_at_k(approx, exact, k=3) == pytest.approx(0.5)
    assert bm.recall_at_k(exact, exact, k=3) == 1.0


def test_faiss_exact_search_is_numpy_top_k():
    rng = np.random.default_rng(0)
    basis = bm.synthetic_basis(16, rng)
    xb = bm.synthetic_unit_vectors(300, 16, rng, basis, block=64)
    xq = bm.synthetic_unit_vectors(7, 16, rng, basis)
    np.testing.assert_allclose(np.linalg.norm(xb, axis=1), 1.0, rtol=1e-5)
    index = faiss.IndexFlatIP(16)
    index.add(xb)
    scores, ids = index.search(xq, 10)
    sims = xq.astype(np.float64) @ xb.T.astype(np.float64)  # (7, 300)
    np.testing.assert_array_equal(ids, np.argsort(-sims, axis=1)[:, :10])
    np.testing.assert_allclose(scores, np.sort(sims, axis=1)[:, ::-1][:, :10], rtol=1e-5)
    # IVF probing every list is exhaustive: recall 1 against exact search
    ivf = bm.ivf_index(xb, nlist=8, seed=0)
    ivf.nprobe = 8
    assert bm.recall_at_k(ivf.search(xq, 10)[1], ids) == 1.0


def test_gallery_sweep_rows():
    sweep = bm.gallery_sweep(dim=8, sizes=[40, 400], n_queries=20, timed_queries=3, target_recall=0.9, seed=1)
    assert sweep["dim"] == 8 and list(sweep["sizes"]) == ["40", "400"]
    for n, row in ((40, sweep["sizes"]["40"]), (400, sweep["sizes"]["400"])):
        assert row["n"] == n and row["nlist"] == round(n ** 0.5)
        assert row["calibration_recall_at_10"] >= 0.9 or row["nprobe"] == row["nlist"]
        assert 0.0 <= row["recall_at_10"] <= 1.0 and 1 <= row["nprobe"] <= row["nlist"]
        assert row["exact_median_ms"] > 0 and row["approx_median_ms"] > 0


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ce") / "backbone"
    write_initial_checkpoint(folder, WORDS, BackboneConfig(hidden_size=16, num_attention_heads=2,
                                                           intermediate_size=32), img_feature_dim=6, seed=2)
    tok = load_tokenizer(folder)
    rng = np.random.default_rng(3)
    texts = encode_captions(tok, ["a red star", "a blue circle left of a red square"], 12)
    images = encode_images(tok, [["star"], ["circle", "square", "star"]],
                           [rng.standard_normal((2, 6)).astype(np.float32), rng.standard_normal((3, 6)).astype(np.float32)],
                           12, 4)
    return load_backbone(folder).eval(), tok, texts, images


def test_joint_inputs_by_hand(tiny_inputs):
    _, tok, texts, images = tiny_inputs
    pairs = joint_inputs(texts, images, [0, 1], [1, 0], max_length=64)
    ids = lambda words: tok.convert_tokens_to_ids(words)  # noqa: E731
    row0 = ids(["[CLS]", "a", "red", "star", "[SEP]", "circle", "square", "star", "[SEP]"])
    row1 = ids(["[CLS]", "a", "blue", "circle", "left", "of", "a", "red", "square", "[SEP]", "star", "[SEP]"])
    assert pairs.input_ids[0].tolist() == row0 + [0] * 3 and pairs.input_ids[1].tolist() == row1
    assert pairs.token_type_ids[0].tolist() == [0] * 5 + [1] * 4 + [0] * 3
    assert pairs.token_type_ids[1].tolist() == [0] * 10 + [1] * 2
    # text mask, then the region slots of each pair's image (3 of 4 real regions, then 2 of 4)
    assert pairs.attention_mask[0].tolist() == [1] * 9 + [0] * 3 + [1, 1, 1, 0]
    assert pairs.attention_mask[1].tolist() == [1] * 12 + [1, 1, 0, 0]
    torch.testing.assert_close(pairs.img_feats, images.img_feats[[1, 0]])
    assert joint_inputs(texts, images, [1], [1], max_length=8).input_ids.shape == (1, 8)  # cut at the position table


def test_cross_encoder_scores_each_pair_alone(tiny_inputs):
    backbone, _, texts, images = tiny_inputs
    model = CrossEncoder(backbone, seed=0).eval()
    with torch.no_grad():
        batch = model(joint_inputs(texts, images, [0, 1, 1], [1, 0, 1], 64))  # (3,)
        alone = torch.cat([model(joint_inputs(texts, images, [c], [i], 64)) for c, i in ((0, 1), (1, 0), (1, 1))])
        pairs = joint_inputs(texts, images, [0], [1], 64)
        cls = backbone.forward_image(pairs.input_ids, pairs.token_type_ids, pairs.attention_mask, pairs.img_feats)[:, 0]
        direct = model.classifier(torch.tanh(model.pooler(cls)))[:, 0]
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5)  # padding changes no score
    torch.testing.assert_close(batch[:1], direct)
    timing = {"per_pair_ms": 0.5, "per_pair_p95_ms": 0.75, "n_pairs": 64}
    assert query_latency(timing, 1000) == {"median_ms": 500.0, "p95_ms": 750.0, "gallery_size": 1000,
                                           "extrapolated_from_pairs": 64}


# ---------------------------------------------------------------------------------------------------
# The stage on a micro dataset

MICRO = {
    "data": {"n_train": 6, "n_val": 4, "n_test": 6, "image_size": 64, "single_1k_size": 3},
    "backbone": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
    "features": {"min_size": 64, "max_size": 112},
    "model": {"matching_ff": 16},
    "eval": {"fold_size": 3, "chunk_size": 4},
}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    cfg = load_params(micro_world(root, MICRO))
    model = Aladin(load_backbone(root / "backbone"), cfg.model, cfg.compat)  # untrained: cost, not accuracy
    save_model(model, root / "model", root / "backbone", {"note": "untrained"})
    return root


def test_stage_writes_the_benchmark_json(micro, tmp_path, capsys):
    out = tmp_path / "benchmark.json"
    threads = torch.get_num_threads()
    assert benchmark_stage.main(["--params", str(micro / "params.yaml"), "--dataset", str(micro / "dataset"),
                                 "--features", str(micro / "features"), "--model", str(micro / "model"),
                                 "--out", str(out), "--sweep-max", "700"]) == 0
    assert torch.get_num_threads() == threads  # benchmark.threads applies to the benchmark only
    bench = json.loads(out.read_text())
    assert "matching vs cross-encoder" in capsys.readouterr().out
    settings = load_params(micro / "params.yaml").benchmark
    assert bench["device"]["type"] == "cpu" and bench["gallery"]["n_images"] == 6
    assert bench["device"]["torch_threads"] == bench["device"]["faiss_threads"] == settings.threads
    modes = {"matching", "alignment", "crossencoder", *(f"rerank@{k}" for k in settings.rerank_k)}
    assert set(bench["latency"]) == modes
    lat = bench["latency"]
    for mode in modes - {"crossencoder"}:
        assert lat[mode]["n_queries"] == min(settings.latency_queries, 30)  # 6 images x 5 captions
    cross = bench["crossencoder"]
    assert lat["crossencoder"]["median_ms"] == pytest.approx(cross["per_pair_ms"] * 6)
    sp = bench["speedup"]
    assert sp["matching_vs_crossencoder"] == pytest.approx(lat["crossencoder"]["median_ms"] / lat["matching"]["median_ms"])
    assert sp["matching_vs_alignment"] == pytest.approx(lat["alignment"]["median_ms"] / lat["matching"]["median_ms"])
    assert sp["alignment_vs_crossencoder"] == pytest.approx(lat["crossencoder"]["median_ms"] / lat["alignment"]["median_ms"])
    assert bench["speedup_search"]["matching_vs_alignment"] == pytest.approx(
        lat["alignment"]["search_median_ms"] / lat["matching"]["search_median_ms"])
    th = bench["alignment_throughput"]
    assert th["matmul_over_alignment"] == pytest.approx(th["matmul_pairs_per_s"] / th["alignment_pairs_per_s"])
    assert th["n_images"] == 6 and th["n_captions"] == 30 and th["hidden"] == 16
    pw = bench["alignment_throughput_paper_width"]
    assert (pw["hidden"], pw["region_tokens"], pw["word_tokens"]) == (768, 33, 47)
    assert pw["matmul_over_alignment"] == pytest.approx(pw["matmul_pairs_per_s"] / pw["alignment_pairs_per_s"])
    assert bench["encoding"]["images"]["n"] == 6 and bench["encoding"]["captions"]["n"] == 30
    sweep = bench["sweep"]
    assert sweep["dim"] == 16
    assert sorted(int(n) for n in sweep["sizes"]) == bm.sweep_sizes(6, 700) == [6, 60, 600, 700]
    for row in sweep["sizes"].values():
        assert row["speedup_vs_crossencoder"] == pytest.approx(row["crossencoder_ms"] / row["matching_ms"])
        assert row["crossencoder_ms"] == pytest.approx(cross["per_pair_ms"] * row["n"])
        # every size up to benchmark.alignment_sweep_max also times the alignment head
        assert ("alignment_ms" in row) == (row["n"] <= settings.alignment_sweep_max)
        if "alignment_ms" in row:
            assert row["alignment_ms"] == pytest.approx(lat["alignment"]["encode_median_ms"] + row["alignment_search_ms"])
            assert row["matching_vs_alignment"] == pytest.approx(row["alignment_ms"] / row["matching_ms"])


def test_alignment_search_over_a_tiled_gallery_ranks_like_the_full_matrix(micro):
    """The timed search is a real search: on a gallery tiled to n images, its scores are the full
    similarity matrix's columns, repeated."""
    from aladin.backbone import load_tokenizer
    from aladin.regions import RegionFeatures
    from aladin.retrieval import alignment_similarities, encode_split, subset
    from aladin.splits import load_split
    from aladin.train import load_model

    cfg = load_params(micro / "params.yaml")
    features = RegionFeatures(micro / "features", expected_dim=cfg.model.img_feature_dim)
    split = load_split(micro / "dataset", features, "test", load_tokenizer(micro / "model"), cfg.model, cfg.compat,
                       cfg.data.captions_per_image)
    model = load_model(micro / "model", cfg.model, cfg.compat).eval()
    enc = encode_split(model, split, 8)
    full = alignment_similarities(model, enc, 4)  # (6, 30)
    tiled = subset(enc.img_set, torch.arange(15) % 6)
    scores = model.alignment_scores(tiled, subset(enc.txt_set, torch.tensor([3])), 4)[:, 0]  # (15,)
    torch.testing.assert_close(scores, full[torch.arange(15) % 6, 3])
    assert bm.alignment_search_ms(model, enc, 15, 3, 4) > 0


def test_stage_names_a_missing_model(micro, tmp_path, capsys):
    out = tmp_path / "benchmark.json"
    assert benchmark_stage.main(["--params", str(micro / "params.yaml"), "--dataset", str(micro / "dataset"),
                                 "--features", str(micro / "features"), "--model", str(tmp_path / "nope"),
                                 "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope" in err[0]
    assert not out.exists()
