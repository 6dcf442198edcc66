"""Measure the efficiency claim: per-query latency of every retrieval mode and of a VinVL-style cross-encoder
on the test gallery, speed-up ratios, alignment-head throughput, and a FAISS gallery-size sweep.

Everything runs on one device (benchmark.device; auto = CUDA when available) in one process, so the
ratios compare like with like. Figures are timings: they change from run to run and machine to machine.

Reads   --dataset DIR, --features DIR, --model DIR (output of train_distill),
        params.yaml sections seed, data, model, compat, eval (batch_size, chunk_size), benchmark
Writes  --out FILE (metrics/benchmark.json); prints the headline figures
Run     dvc repro benchmark; by hand, with the sweep to a million vectors:
        python -m stages.benchmark --dataset data/dataset --features data/features --model models/distill
            --out /tmp/benchmark_1m.json --sweep-max 1000000
"""
from __future__ import annotations

import argparse
import dataclasses

from aladin.backbone import load_tokenizer
from aladin.benchmark import headline, resolve_device, run_benchmark
from aladin.config import load_params
from aladin.io import PipelineError, write_json
from aladin.regions import RegionFeatures, check_model_dim
from aladin.splits import load_split
from aladin.train import load_model, seed_everything
from stages.common import run


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--dataset", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--sweep-max", type=int, default=None,
                   help="override benchmark.sweep_max for a by-hand run (e.g. 1000000 on the embedded profile)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        settings = params.benchmark
        if args.sweep_max is not None:
            if args.sweep_max < 1:
                raise PipelineError(f"--sweep-max must be a positive integer, got {args.sweep_max}")
            settings = dataclasses.replace(settings, sweep_max=args.sweep_max)
        try:
            resolve_device(settings.device)
        except ValueError as e:  # e.g. benchmark.device: cuda on a machine without a GPU
            raise PipelineError(f"{args.params}: {e}") from None
        seed_everything(params.seed)
        features = RegionFeatures(args.features, expected_dim=params.model.img_feature_dim)
        check_model_dim(features, args.model)
        test = load_split(args.dataset, features, "test", load_tokenizer(args.model), params.model,
                          params.compat, params.data.captions_per_image)
        model = load_model(args.model, params.model, params.compat).eval()
        bench = run_benchmark(model, test, settings, params.eval.batch_size, params.eval.chunk_size, params.seed)
        write_json(args.out, bench)
        for line in headline(bench):
            print(line)
        return 0

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())
