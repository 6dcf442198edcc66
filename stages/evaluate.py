"""Evaluate both heads of the distilled model on the test split.

Recall (i2t and t2i R@1/5/10, medr, meanr, rsum) and NDCG@25 with ROUGE-L relevance for the matching head
(kNN in the common space), the alignment head (brute-force MrSw) and re-ranking (`rerank@k`: the matching
head's k best re-scored by the alignment head, for each k of eval.rerank_k), under VinVL's single 1K set
(`vinvl_1k`: the images of the dataset's test_img_keys_1k.tsv, evaluated once; recorded as absent when the
dataset has no such file), the fold-mean protocol (`eval.fold_size` images per fold, the "1K 5-fold"
analogue) and the whole split (the "5K" analogue); per-query search latency of each mode; the top-k images
of a few caption queries for the report. SPICE relevance is reported as absent (it needs Java and the SPICE
jar).

Reads   --dataset DIR (and its test_img_keys_1k.tsv if any), --features DIR, --model DIR (from train_distill),
        params.yaml sections data, model, compat, eval, report
Writes  --metrics FILE (deterministic recall metrics, protocol recorded), --latency FILE (timings:
        nondeterministic, kept apart), --qualitative FILE
Run     dvc repro evaluate
"""
from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

from aladin.backbone import load_tokenizer
from aladin.config import load_params
from aladin.data import KARPATHY_FILE
from aladin.evaluate import latency_metrics, qualitative, recall_metrics, run_labels, single_1k_subset
from aladin.io import PipelineError, atomic_path, dumps_json
from aladin.regions import RegionFeatures, check_model_dim
from aladin.retrieval import encode_split
from aladin.splits import load_split
from aladin.train import load_model, seed_everything
from stages.common import run


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--dataset", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--latency", required=True)
    p.add_argument("--qualitative", required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        seed_everything(params.seed)
        features = RegionFeatures(args.features, expected_dim=params.model.img_feature_dim)
        check_model_dim(features, args.model)
        test = load_split(args.dataset, features, "test", load_tokenizer(args.model), params.model,
                          params.compat, params.data.captions_per_image)
        if params.eval.fold_size > len(test.records):
            raise PipelineError(f"{args.params}: eval.fold_size ({params.eval.fold_size}) is larger than the test split "
                                f"({len(test.records)} images in {Path(args.dataset) / KARPATHY_FILE})")
        single_1k = single_1k_subset(args.dataset, test)  # a bad key file fails before the model is run
        model = load_model(args.model, params.model, params.compat).eval()
        encoded = encode_split(model, test, params.eval.batch_size)  # the gallery, encoded once
        metrics, sims = recall_metrics(model, test, encoded, params.eval, params.data.source, single_1k)
        metrics.update(run_labels(params))
        latency = latency_metrics(model, test, encoded, params.eval)
        examples = qualitative(test, sims, params.eval.qualitative_queries, params.report.qualitative_top_k)
        with ExitStack() as stack:  # all three written before any is renamed into place
            for path, record in ((args.metrics, metrics), (args.latency, latency), (args.qualitative, examples)):
                stack.enter_context(atomic_path(path)).write_text(dumps_json(record))
        for head in (h for h in metrics if isinstance(metrics[h], dict)):
            m = metrics[head]
            single = m["vinvl_1k"]
            single = "absent" if "absent" in single else f"{single['rsum']:6.1f} (single {single['n_images']})"
            print(f"{head:11s} rsum {single}  {m['coco_1k_5fold']['rsum']:6.1f} (folds of {params.eval.fold_size})  "
                  f"{m['coco_5k']['rsum']:6.1f} (all {len(test.images)})  NDCG@25 ROUGE-L i2t "
                  f"{m['coco_5k']['ndcg_rougeL_i2t']:.3f} t2i {m['coco_5k']['ndcg_rougeL_t2i']:.3f}  "
                  f"t2i latency {latency[head]['t2i']['median_ms']:.2f} ms/query "
                  f"(search alone {latency[head]['t2i']['search_median_ms']:.3f} ms)")
        return 0

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())
