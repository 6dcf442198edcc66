"""Training and evaluating any recipe of `aladin.recipes` (TERAN, SelfAlign) on the pipeline's data.

The same training pairs, batch order, validation protocol and evaluator as ALADIN's stages, so the three
systems are compared on one split with one evaluator (PEERS.md section 2). A recipe module `aladin.recipes.<name>`
exposes `CONFIG` (a frozen dataclass: architecture and training schedule, embedded defaults) and
`build(cfg, backbone_dir, img_feature_dim, seed)`; its params live in `params.yaml` under `peers.<name>`.
"""
from __future__ import annotations

import importlib
import statistics
import time
from dataclasses import dataclass

import torch

from .config import RECIPES_DIR, ConfigError, EvalConfig, Params, _build
from .evaluate import PROTOCOLS, single_1k_subset
from .evaluation import evaluate_protocol
from .ndcg import rouge_l_relevance
from .pairs import batch_inputs
from .recipes import Reps, RetrievalRecipe, concat_reps, weighted_total
from .retrieval import percentile, synchronize
from .splits import SplitInputs

NOT_RECIPES = ("__init__", "base", "aladin_heads")  # modules of aladin/recipes that are no trainable recipe

# ---------------------------------------------------------------------------------------------------
# Recipes by name


def recipe_module(name: str):
    if not (RECIPES_DIR / f"{name}.py").is_file() or name in NOT_RECIPES:
        raise ConfigError(f"peers: unknown recipe '{name}' (a recipe is a module aladin/recipes/<name>.py)")
    return importlib.import_module(f"aladin.recipes.{name}")


def recipe_config(params: Params, name: str, source: str = "params"):
    """The recipe's typed config from `peers.<name>` (unknown keys and wrong types named as for any section)."""
    module = recipe_module(name)
    try:
        return _build(module.CONFIG, params.peers.sections.get(name), f"peers.{name}", source)
    except ConfigError:
        raise
    except ValueError as e:  # a recipe config's own range checks (__post_init__) name their key
        raise ConfigError(f"{source}: peers.{e}") from None


def build_recipe(params: Params, name: str, backbone_dir, source: str = "params") -> tuple[RetrievalRecipe, object]:
    cfg = recipe_config(params, name, source)
    module = recipe_module(name)
    return module.build(cfg, backbone_dir, params.model.img_feature_dim, params.seed), cfg


# ---------------------------------------------------------------------------------------------------
# Encoding and scoring a split


@torch.inference_mode()
def encode(recipe: RetrievalRecipe, split: SplitInputs, batch_size: int) -> tuple[Reps, Reps]:
    """The whole split, each modality on its own, in batches."""
    recipe.eval()
    n_img, n_txt = split.images.img_feats.shape[0], split.texts.input_ids.shape[0]
    img = concat_reps([recipe.encode_images(split.images[i:i + batch_size]) for i in range(0, n_img, batch_size)])
    txt = concat_reps([recipe.encode_texts(split.texts[i:i + batch_size].trimmed())
                       for i in range(0, n_txt, batch_size)])
    return img, txt


@torch.inference_mode()
def similarities(recipe: RetrievalRecipe, split: SplitInputs, cfg: EvalConfig) -> torch.Tensor:
    img, txt = encode(recipe, split, cfg.batch_size)
    return recipe.score(img, txt, cfg.chunk_size).float()  # (N_images, N_captions)


def rsum_of(sims: torch.Tensor, split: SplitInputs) -> float:
    return evaluate_protocol(sims.cpu().numpy(), split.image_of_caption)["rsum"]


# ---------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class Schedule:
    """The training fields every recipe config carries (PEERS.md 3.4, 4.10)."""

    epochs: int
    batch_size: int
    lr: float
    lr_step: int
    lr_gamma: float
    grad_clip: float
    loss_weights: dict


def schedule_of(cfg) -> Schedule:
    """The schedule fields of a recipe config; every recipe config names them the same way and gives its
    loss weights by `loss_weights()` (one `weight_<term>` field per loss term)."""
    return Schedule(cfg.epochs, cfg.batch_size, cfg.lr, cfg.lr_step, cfg.lr_gamma, cfg.grad_clip,
                    dict(cfg.loss_weights()))


def fit(recipe: RetrievalRecipe, schedule: Schedule, loader, val: SplitInputs, eval_cfg: EvalConfig,
        device: torch.device, on_epoch_end) -> dict:
    """Adam over the trainable parameters, StepLR per epoch, global-norm clipping; the weights of the best
    validation rsum (coco_5k protocol on the validation split) are kept and loaded at the end.

    `on_epoch_end(epoch, metrics)` gets the epoch's mean loss terms and the validation rsum. Raises
    ValueError on a non-finite loss, naming epoch and batch.
    """
    params = [p for p in recipe.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=schedule.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=schedule.lr_step, gamma=schedule.lr_gamma)
    best, best_state = {"rsum": float("-inf")}, None
    for epoch in range(schedule.epochs):
        recipe.train()
        sums: dict[str, float] = {}
        n = 0
        for b, batch in enumerate(loader):
            images, texts = batch_inputs(batch, device)
            terms = recipe.losses(recipe.encode_images(images), recipe.encode_texts(texts), epoch)
            loss = weighted_total(terms, schedule.loss_weights)
            if not torch.isfinite(loss):
                raise ValueError(f"loss is {loss.item()} at epoch {epoch}, batch {b} of the epoch (both counted from 0)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if schedule.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, schedule.grad_clip)
            optimizer.step()
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n += 1
        scheduler.step()
        rsum = rsum_of(similarities(recipe, val, eval_cfg), val)
        metrics = {"train": {k: v / max(n, 1) for k, v in sums.items()}, "val": {"rsum": rsum}}
        if rsum > best["rsum"]:
            best = {"epoch": epoch, "rsum": rsum}
            best_state = {k: v.detach().clone() for k, v in recipe.state_dict().items()}
        on_epoch_end(epoch, metrics)
    if best_state is not None:
        recipe.load_state_dict(best_state)
    return best


# ---------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(recipe: RetrievalRecipe, split: SplitInputs, cfg: EvalConfig, dataset_dir, name: str,
             dataset: str) -> tuple[dict, torch.Tensor]:
    """The recipe's record in the schema of metrics/eval.json (one head, named after the recipe): the
    single-1K, 5-fold-1K and whole-split protocols, recalls, medr, meanr, rsum, NDCG@25 (ROUGE-L)."""
    sims = similarities(recipe, split, cfg).cpu().numpy()
    relevance = rouge_l_relevance(split.captions, split.image_of_caption.numpy(), len(split.images))
    single = single_1k_subset(dataset_dir, split)
    record = {}
    for protocol in PROTOCOLS:
        if protocol == "vinvl_1k":
            if "absent" in single:
                record[protocol] = {"protocol": protocol, "absent": single["absent"], "head": name}
                continue
            r = evaluate_protocol(sims, split.image_of_caption, protocol=protocol, relevance=relevance,
                                  images=single["images"])
            record[protocol] = dict(r, keys_file=single["keys_file"], head=name)
        else:
            fold = cfg.fold_size if protocol == "coco_1k_5fold" else None
            record[protocol] = dict(evaluate_protocol(sims, split.image_of_caption, fold_size=fold, protocol=protocol,
                                                      relevance=relevance), head=name)
    return {"schema_version": 1, "dataset": dataset, "split": "test", name: record}, torch.from_numpy(sims)


@torch.inference_mode()
def query_latency(recipe: RetrievalRecipe, split: SplitInputs, cfg: EvalConfig, n_queries: int) -> dict:
    """Per text query against the pre-encoded test gallery: encode the caption alone, score it against every
    image (chunked), take the top 10. Median and p95 in ms, query encoding included and stated apart."""
    recipe.eval()
    device = split.images.img_feats.device
    img, _ = encode(recipe, split, cfg.batch_size)
    total, enc = [], []
    n = min(n_queries, split.texts.input_ids.shape[0])
    for i in range(-1, n):  # query -1 is a warm-up
        synchronize(device)
        start = time.perf_counter()
        q = recipe.encode_texts(split.texts[max(i, 0):max(i, 0) + 1].trimmed())
        synchronize(device)
        middle = time.perf_counter()
        scores = recipe.score(img, q, cfg.chunk_size)[:, 0]
        torch.topk(scores, min(10, scores.shape[0]))
        synchronize(device)
        if i >= 0:
            total.append((time.perf_counter() - start) * 1000.0)
            enc.append((middle - start) * 1000.0)
    return {"median_ms": statistics.median(total), "p95_ms": percentile(total, 0.95),
            "encode_median_ms": statistics.median(enc), "n_queries": n, "index_kind": recipe.index_kind,
            "n_images": int(split.images.img_feats.shape[0])}
