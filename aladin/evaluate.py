"""The evaluate stage's work: both heads and re-ranking on the test split, every protocol, latency, qualitative top-k."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from .config import EvalConfig
from .data import SINGLE_1K_FILE, key_rows, read_img_keys
from .evaluation import evaluate_protocol
from .model import Aladin
from .ndcg import rouge_l_relevance
from .retrieval import EncodedSplit, alignment_similarities, matching_similarities, measure_latency, top_images
from .splits import SplitInputs

SCHEMA_VERSION = 1
PROTOCOLS = ("vinvl_1k", "coco_1k_5fold", "coco_5k")


def single_1k_subset(dataset_dir, split: SplitInputs) -> dict:
    """The `vinvl_1k` protocol's images: {"keys_file": path, "images": int64 `[K]` rows of `split`}, or
    {"absent": reason} when the dataset folder has no key file (COCO without downloads.vinvl_test_img_keys_1k).
    A key that is not an image of `split` is a PipelineError naming the file and line."""
    path = Path(dataset_dir) / SINGLE_1K_FILE
    if not path.is_file():
        return {"absent": f"{path} does not exist: the data stage writes it for data.source synthetic, and for "
                          "coco from downloads.vinvl_test_img_keys_1k when that entry has a URL"}
    rows = key_rows(path, read_img_keys(path), [r.image_id for r in split.records])
    return {"keys_file": str(path), "images": rows}


def recall_metrics(model: Aladin, split: SplitInputs, enc: EncodedSplit, cfg: EvalConfig,
                   dataset: str, single_1k: dict | None = None) -> tuple[dict, dict]:
    """Metrics of every retrieval mode under every protocol, and the similarity matrices they came from.

    `vinvl_1k` is the one image subset of `single_1k` (`single_1k_subset`: VinVL's `test_img_keys_1k.tsv`)
    evaluated once, recorded with its `keys_file`, or `{"protocol", "absent": reason, "head"}` without a
    key file; left out when `single_1k` is None. `coco_1k_5fold` is the mean over sequential folds of
    `eval.fold_size` images (COCO: 5 x 1000); `coco_5k` is the whole test split (ALADIN.md 7.5). Under the
    synthetic profile the names mean the scaled-down analogues; `n_images` and `n_folds` say what was
    evaluated. Modes: `matching`, `alignment` and `rerank@k` (the matching head's k best re-scored by the
    alignment head, k capped by each gallery, i.e. each fold or the subset). Every record with numbers has
    NDCG@25 with ROUGE-L relevance (ALADIN.md 7.6).
    """
    sims = {"matching": matching_similarities(enc), "alignment": alignment_similarities(model, enc, cfg.chunk_size)}
    matching, alignment = sims["matching"].cpu().numpy(), sims["alignment"].cpu().numpy()
    relevance = rouge_l_relevance(split.captions, split.image_of_caption.numpy(), len(split.images))  # (M, N)
    modes = {"matching": (matching, None), "alignment": (alignment, None)}
    for k in cfg.rerank_k:
        modes[f"rerank@{k}"] = (matching, (alignment, k))
    out = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "split": "test"}
    for head, (s, rerank) in modes.items():
        out[head] = {}
        if single_1k is not None and "absent" in single_1k:
            out[head]["vinvl_1k"] = {"protocol": "vinvl_1k", "absent": single_1k["absent"], "head": head}
        elif single_1k is not None:
            record = evaluate_protocol(s, split.image_of_caption, protocol="vinvl_1k", relevance=relevance,
                                       rerank=rerank, images=single_1k["images"])
            out[head]["vinvl_1k"] = dict(record, keys_file=single_1k["keys_file"], head=head)
        for protocol, fold_size in (("coco_1k_5fold", cfg.fold_size), ("coco_5k", None)):
            record = evaluate_protocol(s, split.image_of_caption, fold_size=fold_size, protocol=protocol,
                                       relevance=relevance, rerank=rerank)
            out[head][protocol] = dict(record, head=head)
    return out, sims


def run_labels(params) -> dict:
    """What PEERS.md 8.7 asks every metrics file to record beside the protocol and head: which region
    features were scored (always the pipeline's VinVL layout; BUTD-36 comes in through aladin.butd) and
    that the numbers are of one model, not an ensemble."""
    f = params.features
    origin = "a VinVL dump" if f.source == "vinvl_dump" else f"extracted here ({f.mode})"
    return {"features": f"VinVL layout, {params.model.img_feature_dim - 6}-d + 6 geometry, {origin}",
            "ensemble": False}


def latency_metrics(model: Aladin, split: SplitInputs, enc: EncodedSplit, cfg: EvalConfig) -> dict:
    """Per-query latency of every mode (query encoding included), with what was measured where."""
    timing = measure_latency(model, split, enc, cfg.latency_queries, cfg.chunk_size, rerank_k=cfg.rerank_k)
    device = enc.img_emb.device
    processor = platform.processor() or platform.machine()
    return dict(timing, device=device.type,
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else processor,
                processor=processor,
                torch_version=torch.__version__, threads=torch.get_num_threads(),
                n_images=len(split.images), n_captions=len(split.texts), includes_query_encoding=True,
                gallery_encoding="precomputed")


def qualitative(split: SplitInputs, sims: dict, n_queries: int, top_k: int) -> dict:
    """Top-k images for evenly spaced caption queries, for the report's qualitative grid."""
    n = len(split.texts)
    picks = sorted({round(i * (n - 1) / max(1, n_queries - 1)) for i in range(min(n_queries, n))})
    ids = [r.image_id for r in split.records]
    queries = []
    for head in sims:
        ranked = top_images(sims[head], picks, top_k)
        for q, (c, row) in enumerate(zip(picks, ranked)):
            if len(queries) <= q:
                queries.append({"caption": split.captions[c], "image_id": ids[int(split.image_of_caption[c])]})
            queries[q][head] = [ids[i] for i in row]
    shown = {i for q in queries for head in sims for i in q[head]} | {q["image_id"] for q in queries}
    files = {str(r.image_id): r.file_name for r in split.records if r.image_id in shown}
    return {"top_k": top_k, "queries": queries, "images": files}
