"""The training engine on a micro world: recipes against their terms, lazy pairs against the in-memory split,
the batch order, worker-count independence, bf16, resume, pass-through."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from aladin.backbone import load_backbone, load_tokenizer, write_initial_checkpoint
from aladin.benchmark_training import WORDS, write_synthetic_inputs
from aladin.config import BackboneConfig, CompatConfig, ModelConfig, TrainConfig
from aladin.distributed import Distributed
from aladin.losses import hinge_triplet, listnet_distillation
from aladin.model import Aladin
from aladin.pairs import PairBatches, batch_inputs, collate_pairs, default_workers, load_training_pairs, pair_loader
from aladin.regions import RegionFeatures
from aladin.report import load_dvclive_history
from aladin.splits import load_split
from aladin.train import Recipe, batch_loss, make_optimizer, save_model, train_step
from stages import train_alignment, train_distill

MODEL = ModelConfig(max_seq_length=16, max_img_seq_length=5, img_feature_dim=22, matching_ff=16)
CPU = Distributed(0, 1, 0, torch.device("cpu"))
THREE = dict(losses=("alignment", "distillation", "matching"), loss_weights=(1.0, 1.0, 0.1))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """8 training and 4 validation images (3 to 7 regions of 16 + 6 values), a 1-layer backbone, params."""
    root = tmp_path_factory.mktemp("world")
    write_synthetic_inputs(root / "dataset", {"train": 8, "val": 4}, regions=7, min_regions=3,
                           feature_dim=MODEL.img_feature_dim, seed=1)
    (root / "dataset" / "features").rename(root / "features")
    write_initial_checkpoint(root / "backbone", WORDS, BackboneConfig(hidden_size=16, num_hidden_layers=1,
                                                                      num_attention_heads=2, intermediate_size=32,
                                                                      max_position_embeddings=32),
                             img_feature_dim=MODEL.img_feature_dim, seed=2)
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["model"].update(max_seq_length=16, max_img_seq_length=5, img_feature_dim=22, matching_ff=16)
    params["train_alignment"].update(epochs=2, batch_size=8, lr=1e-3)
    params["distill"].update(epochs=1, batch_size=8)
    params["eval"].update(batch_size=16, chunk_size=8)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def with_params(world, tmp_path, name="params.yaml", **sections):
    params = yaml.safe_load((world / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(params))
    return path


def stage_args(world, params, out, *extra, source=("--backbone", None)):
    flag, folder = source
    return ["--params", str(params), "--dataset", str(world / "dataset"), "--features", str(world / "features"),
            flag, str(folder or world / "backbone"), "--out", str(out), "--live", f"{out}_live",
            "--device", "cpu", *extra]


def parts(world, compat=CompatConfig()):
    features = RegionFeatures(world / "features", expected_dim=MODEL.img_feature_dim)
    tokenizer = load_tokenizer(world / "backbone")
    pairs = load_training_pairs(world / "dataset", features, "train", tokenizer, MODEL, compat, 5)
    torch.manual_seed(0)
    model = Aladin(load_backbone(world / "backbone"), MODEL, compat)
    return features, tokenizer, pairs, model


def first_batch(pairs, n=8):
    return batch_inputs(collate_pairs([pairs[k] for k in range(n)]), "cpu")


# ---------------------------------------------------------------------------------------------------
# Data


def test_lazy_pairs_equal_the_in_memory_split(world):
    features, tokenizer, pairs, _ = parts(world)
    split = load_split(world / "dataset", features, "train", tokenizer, MODEL, CompatConfig(), 5)
    assert len(pairs) == len(split.texts) == 40
    for k in range(len(pairs)):
        images, texts = batch_inputs(collate_pairs([pairs[k]]), "cpu")
        i = int(split.image_of_caption[k])
        for field in ("input_ids", "token_type_ids", "attention_mask", "img_feats", "lengths"):
            got, want = getattr(images, field), getattr(split.images, field)
            assert got.dtype == want.dtype and torch.equal(got[0], want[i]), field
        for field in ("input_ids", "attention_mask", "lengths"):
            got, want = getattr(texts, field), getattr(split.texts, field)
            assert got.dtype == want.dtype and torch.equal(got[0], want[k]), field


def naive_batches(n, batch_size, seed, epochs):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).tolist()
        chunks = [order[s: s + batch_size] for s in range(0, n, batch_size)]
        out.append([c for c in chunks if len(c) > 1])
    return out


def test_batch_order_is_the_seeded_permutation_and_ranks_take_contiguous_slices():
    sampler = PairBatches(23, 5, torch.Generator().manual_seed(3))
    got = [list(sampler), list(sampler)]  # two epochs: a fresh permutation each
    assert got == naive_batches(23, 5, 3, 2) and len(got[0]) == len(sampler) == 5  # last batch of 3 kept
    assert got[0] != got[1]
    assert len(list(PairBatches(21, 5, torch.Generator().manual_seed(3)))) == 4  # a lone last pair is dropped
    for world_size in (2, 3):
        ranks = [list(PairBatches(23, 5, torch.Generator().manual_seed(3), r, world_size)) for r in range(world_size)]
        assert all(len(r) == len(PairBatches(23, 5, torch.Generator(), 0, world_size)) for r in ranks)
        for step, global_batch in enumerate(naive_batches(23, 5, 3, 1)[0]):
            assert sum((r[step] for r in ranks), []) == global_batch  # contiguous slices, rank order
            assert max(len(r[step]) for r in ranks) - min(len(r[step]) for r in ranks) <= 1


def test_loader_gives_the_same_batches_with_and_without_workers(world):
    _, _, pairs, _ = parts(world)
    runs = []
    for workers in (0, 2):
        sampler = PairBatches(len(pairs), 8, torch.Generator().manual_seed(5))
        loader = pair_loader(pairs, sampler, workers, pin_memory=False, seed=0)
        runs.append([[t.clone() for t in b] for _ in range(2) for b in loader])  # two epochs
    assert len(runs[0]) == len(runs[1]) == 10
    for a, b in zip(*runs):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_default_workers_reads_in_process_on_the_cpu_and_in_workers_on_cuda():
    assert default_workers(torch.device("cpu"), 1) == 0
    assert 1 <= default_workers(torch.device("cuda", 0), 1) <= 8
    assert default_workers(torch.device("cuda", 0), 64) == 1  # many ranks on few CPUs: still one each


# ---------------------------------------------------------------------------------------------------
# Recipes


def independent_terms(model, images, texts, temperature=6.0):
    """The score matrices straight from the model's heads, dropout off, and the three losses on them."""
    model.eval()
    img, txt = model.image_tokens(images), model.text_tokens(texts)
    s_align = model.alignment_scores(*model.alignment_sets(img, txt))
    s_match = model.embed_images(img) @ model.embed_texts(txt).T
    return {"alignment": hinge_triplet(s_align, 0.2, True), "matching": hinge_triplet(s_match, 0.2, True),
            "distillation": listnet_distillation(s_match, s_align, temperature)}


def test_recipe_loss_is_the_weighted_sum_of_its_terms_and_honours_activate_after(world):
    _, _, pairs, model = parts(world)
    images, texts = first_batch(pairs)
    want = independent_terms(model, images, texts)
    recipe = Recipe.from_config(TrainConfig(**THREE, activate_distillation_after=1), CompatConfig())
    model.eval()  # dropout off for the comparison
    loss, terms = batch_loss(model, recipe, images, texts, 1, CPU)
    for k in THREE["losses"]:
        torch.testing.assert_close(terms[k], want[k])
    torch.testing.assert_close(loss, want["alignment"] + want["distillation"] + 0.1 * want["matching"])
    early, terms = batch_loss(model, recipe, images, texts, 0, CPU)  # epoch 0 < 1: no distillation yet
    assert set(terms) == {"alignment", "matching"}
    torch.testing.assert_close(early, want["alignment"] + 0.1 * want["matching"])
    alone = Recipe.from_config(TrainConfig(losses=("distillation",), activate_distillation_after=5), CompatConfig())
    loss, _ = batch_loss(model, alone, images, texts, 0, CPU)  # the only loss is never dropped
    torch.testing.assert_close(loss, want["distillation"])


def test_frozen_backbone_trains_only_the_head_and_distillation_reaches_an_unfrozen_backbone(world):
    _, _, pairs, model = parts(world)
    images, texts = first_batch(pairs)
    frozen = Recipe.from_config(TrainConfig(losses=("distillation",), freeze_backbone=True), CompatConfig())
    params = frozen.prepare(model)
    assert {id(p) for p in params} == {id(p) for p in model.matching_head.parameters()}
    frozen.train_mode(model)
    assert model.backbone.training  # Q9: dropout stays on in the frozen backbone
    Recipe.from_config(TrainConfig(losses=("distillation",), freeze_backbone=True),
                       CompatConfig(frozen_backbone_dropout=False)).train_mode(model)
    assert not model.backbone.training and model.matching_head.training
    loss, _ = batch_loss(model, frozen, images, texts, 0, CPU)
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.matching_head.parameters() if p.requires_grad)

    _, _, _, model = parts(world)
    model.eval()
    e2e = Recipe.from_config(TrainConfig(losses=("distillation",)), CompatConfig())
    loss, _ = batch_loss(model, e2e, images, texts, 0, CPU)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert got["backbone.embeddings.word_embeddings.weight"].abs().sum() > 0  # through the student's tokens
    # The teacher is detached: the same gradient as with the teacher scores fixed beforehand.
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        teacher = model.alignment_scores(*model.alignment_sets(model.image_tokens(images), model.text_tokens(texts)))
    img, txt = model.image_tokens(images), model.text_tokens(texts)
    listnet_distillation(model.embed_images(img) @ model.embed_texts(txt).T, teacher, 6.0).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, msg=n)


@pytest.mark.parametrize("sum_heads, losses, want", [
    (True, ("alignment",), 100 + 7),  # Q8 as the original: the untrained matching head counts too
    (True, ("distillation",), 7),
    (True, ("alignment", "distillation"), 107),
    (False, ("alignment",), 100),  # only the heads the stage trains
    (False, ("matching",), 7),
    (False, ("alignment", "distillation", "matching"), 107),
])
def test_checkpoint_selection_rsum(sum_heads, losses, want):
    recipe = Recipe.from_config(TrainConfig(losses=losses, loss_weights=(1.0,) * len(losses)),
                                CompatConfig(val_rsum_sum_heads=sum_heads))
    assert recipe.selection_rsum({"alignment": {"rsum": 100.0}, "matching": {"rsum": 7.0}}) == want


def test_bf16_autocast_step_keeps_fp32_weights_and_scores(world):
    _, _, pairs, model = parts(world)
    images, texts = first_batch(pairs)
    model.eval()
    fp32, _ = batch_loss(model, Recipe.from_config(TrainConfig(**THREE), CompatConfig()), images, texts, 0, CPU)
    recipe = Recipe.from_config(TrainConfig(**THREE, precision="bf16"), CompatConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, terms = batch_loss(model, recipe, images, texts, 0, CPU)
    assert bf16.dtype == torch.float32 and all(t.dtype == torch.float32 for t in terms.values())
    assert bf16.item() != fp32.item()  # the encoders did run in bf16 ...
    assert abs(bf16.item() - fp32.item()) < 0.05 * abs(fp32.item())  # ... and the result is close
    params = recipe.prepare(model)
    optimizer = make_optimizer(params, 1e-3, CPU.device)
    assert optimizer.defaults["foreach"] and not optimizer.defaults["fused"]
    before = [p.detach().clone() for p in params]
    train_step(model, recipe, images, texts, 0, optimizer, params, CPU)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


# ---------------------------------------------------------------------------------------------------
# Stages: workers, resume, pass-through


def read_history(live):
    rows = (Path(live) / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]
    return [(int(r.split("\t")[-2]), float(r.split("\t")[-1])) for r in rows]


def test_results_do_not_depend_on_the_number_of_workers(world, tmp_path):
    params = with_params(world, tmp_path, train_alignment={"epochs": 1, **THREE})
    for workers in (0, 2):
        assert train_alignment.main(stage_args(world, params, tmp_path / f"w{workers}", "--num-workers",
                                               str(workers))) == 0
    assert (tmp_path / "w0" / "model.safetensors").read_bytes() == (tmp_path / "w2" / "model.safetensors").read_bytes()
    assert read_history(tmp_path / "w0_live") == read_history(tmp_path / "w2_live")


def test_resumed_run_ends_with_the_same_bytes_as_an_uninterrupted_one(world, tmp_path, capsys):
    # Dropout on, all three losses, distillation switched on at epoch 1: every piece of state matters.
    recipe = {**THREE, "activate_distillation_after": 1, "lr_step": 1}
    two = with_params(world, tmp_path, "two.yaml", train_alignment={"epochs": 2, **recipe})
    one = with_params(world, tmp_path, "one.yaml", train_alignment={"epochs": 1, **recipe})
    assert train_alignment.main(stage_args(world, two, tmp_path / "a", "--resume-dir", str(tmp_path / "ra"))) == 0
    assert train_alignment.main(stage_args(world, one, tmp_path / "b", "--resume-dir", str(tmp_path / "rb"))) == 0
    capsys.readouterr()
    assert train_alignment.main(stage_args(world, two, tmp_path / "b", "--resume-dir", str(tmp_path / "rb"))) == 0
    assert "resume: continuing from epoch 1" in capsys.readouterr().out
    for name in ("state/model.safetensors", "state/optimizer.safetensors", "best/model.safetensors"):
        assert (tmp_path / "ra" / name).read_bytes() == (tmp_path / "rb" / name).read_bytes(), name
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert read_history(tmp_path / "a_live") == read_history(tmp_path / "b_live")  # steps 0 and 1, same values
    assert [s for s, _ in read_history(tmp_path / "b_live")] == [0, 1]
    state = json.loads((tmp_path / "rb" / "state" / "state.json").read_text())
    assert state["epoch"] == 2 and state["batch"] == 0 and state["scheduler"]["last_epoch"] == 2
    # A changed param (in the fingerprint) never resumes that state.
    other = with_params(world, tmp_path, "other.yaml", train_alignment={"epochs": 2, **recipe, "temperature": 3.0})
    assert train_alignment.main(stage_args(world, other, tmp_path / "c", "--resume-dir", str(tmp_path / "rb"))) == 0
    out = capsys.readouterr().out
    assert "holds a state of other params or inputs; starting fresh" in out
    assert json.loads((tmp_path / "rb" / "state" / "state.json").read_text())["fingerprint"] != state["fingerprint"]


def test_epochs_zero_passes_the_model_through(world, tmp_path):
    torch.manual_seed(0)
    model = Aladin(load_backbone(world / "backbone"), MODEL, CompatConfig())
    save_model(model, tmp_path / "teacher", world / "backbone", {"stage": "made here"})
    params = with_params(world, tmp_path, distill={"epochs": 0})
    args = stage_args(world, params, tmp_path / "out", source=("--teacher", tmp_path / "teacher"))
    assert train_distill.main(args) == 0
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "teacher" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    meta = json.loads((tmp_path / "out" / "training.json").read_text())
    assert meta["passthrough"] is True and meta["best_epoch"] is None
    history = load_dvclive_history(tmp_path / "out_live")  # what the report stage reads
    assert set(history["metric"]) == {"val/matching/rsum", "val/alignment/rsum", "val/selection_rsum"}
    assert set(history["step"]) == {0}


def test_cuda_without_a_gpu_is_one_error_line(world, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args = stage_args(world, world / "params.yaml", tmp_path / "out")
    args[args.index("--device") + 1] = "cuda"
    assert train_alignment.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no CUDA device" in err[0]
    assert not (tmp_path / "out").exists()
