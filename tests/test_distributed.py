"""Data parallel under torchrun: two CPU processes (gloo) make the same optimiser step as one process.

The test launches this file itself under `python -m torch.distributed.run --nproc_per_node 2`; each rank
takes its contiguous slice of one global batch of 7 pairs (4 + 3 rows, different region and caption widths),
gathers tokens and embeddings with their gradient, averages gradients, clips and steps. The recipe has all
three losses, so every gather is used. Dropout is 0 everywhere: per-rank dropout streams differ by design.
"""
import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aladin.backbone import load_backbone, load_tokenizer, write_initial_checkpoint  # noqa: E402
from aladin.benchmark_training import WORDS, write_synthetic_inputs  # noqa: E402
from aladin.config import BackboneConfig, CompatConfig, ModelConfig, TrainConfig  # noqa: E402
from aladin.distributed import Distributed, close, gather_rows, init_distributed  # noqa: E402
from aladin.model import Aladin  # noqa: E402
from aladin.pairs import PairBatches, batch_inputs, load_training_pairs, pair_loader  # noqa: E402
from aladin.regions import RegionFeatures  # noqa: E402
from aladin.train import Recipe, make_optimizer, train_step  # noqa: E402

MODEL = ModelConfig(max_seq_length=16, max_img_seq_length=6, img_feature_dim=22, matching_ff=16, matching_dropout=0.0)
# Clipping to a norm (like Adam) would hide a wrong overall gradient scale, so the gradient norm before
# clipping is compared too. lr 1e-5 (the paper's): Adam's first step is lr * g / (|g| + 1e-8), so a
# gradient that is zero in exact arithmetic but float noise (the attention key biases, which softmax
# ignores) moves a weight by a fraction of lr in either direction; at 1e-5 that stays below 1e-6.
RECIPE = TrainConfig(losses=("alignment", "distillation", "matching"), loss_weights=(1.0, 1.0, 0.1), lr=1e-5,
                     batch_size=7)


def write_world(root: Path) -> None:
    write_synthetic_inputs(root, {"train": 6}, regions=7, min_regions=2, feature_dim=MODEL.img_feature_dim, seed=4)
    write_initial_checkpoint(root / "backbone", WORDS,
                             BackboneConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0),
                             img_feature_dim=MODEL.img_feature_dim, seed=5)


def one_step(root: Path, d: Distributed) -> dict[str, torch.Tensor]:
    """One training step on the first global batch; returns every gradient and weight after it."""
    torch.manual_seed(0)
    compat = CompatConfig()
    features = RegionFeatures(root / "features", expected_dim=MODEL.img_feature_dim)
    pairs = load_training_pairs(root, features, "train", load_tokenizer(root / "backbone"), MODEL, compat, 5)
    model = Aladin(load_backbone(root / "backbone"), MODEL, compat)
    recipe = Recipe.from_config(RECIPE, compat)
    params = recipe.prepare(model)
    recipe.train_mode(model)
    sampler = PairBatches(len(pairs), RECIPE.batch_size, torch.Generator().manual_seed(1), d.rank, d.world_size)
    batch = next(iter(pair_loader(pairs, sampler, 0, False, 0)))
    images, texts = batch_inputs(batch, d.device)
    optimizer = make_optimizer(params, RECIPE.lr, d.device)
    _, grad_norm = train_step(model, recipe, images, texts, 0, optimizer, params, d)
    out = {"grad_norm": grad_norm.reshape(1)}
    out.update({f"grad.{n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    out.update({f"weight.{n}": p.detach() for n, p in model.named_parameters()})
    out["rows"] = torch.tensor(len(batch[0]))
    return {k: v.contiguous() for k, v in out.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_make_the_single_process_step(tmp_path):
    write_world(tmp_path)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, "--world", str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    single = one_step(tmp_path, Distributed(0, 1, 0, torch.device("cpu")))
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert [int(r["rows"]) for r in ranks] == [4, 3]  # contiguous slices of the global batch of 7
    assert int(single["rows"]) == 7
    assert single["grad_norm"].item() > 2.0  # clipping acted, so the norm check below matters
    names = [k for k in single if k != "rows"]
    assert any(k.startswith("grad.backbone.") for k in names)
    assert any(k.startswith("grad.matching_head.") for k in names)
    for got in ranks:
        assert sorted(k for k in got if k != "rows") == sorted(names)
        for k in names:
            torch.testing.assert_close(got[k], single[k], rtol=1e-5, atol=1e-6, msg=k)


def test_gather_rows_is_the_identity_in_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_rows(x, Distributed(0, 1, 0, torch.device("cpu"))) is x


def worker() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", required=True)
    args = p.parse_args()
    d = init_distributed("cpu")
    try:
        result = one_step(Path(args.world), d)
        save_file(result, Path(args.world) / f"rank{d.rank}.safetensors")
    finally:
        close(d)


if __name__ == "__main__":
    worker()
