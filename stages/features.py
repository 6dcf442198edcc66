"""Extract region features for every image of the dataset (VinVL layout; VINVL.md 6, ALADIN.md 6.3-6.5).

Reads   --data DIR (the data stage's folder: dataset_coco.json, annotations/instances.json, images/),
        --params FILE sections seed, features, and model.img_feature_dim (must equal D + 6)
Writes  --out DIR: features.tsv + features.lineidx (image_id, num_boxes, base64 float32[num_boxes x (D+6)]),
        predictions.tsv + predictions.lineidx (image_id, {"image_h", "image_w", "objects": [{"rect",
        "class", "conf"}]}), imageid2idx.json ({"<image_id>": row}), and failures.json ([{"image_id",
        "file", "message"}]) only when --on-error record skipped an unreadable image; the folder is
        replaced as a whole. Work in progress lives in DIR.shards/rank-00R/ (deleted after the merge);
        a killed run resumes from it.
Run     dvc repro features
        python -m stages.features --params params.yaml --data data/dataset --out data/features
        torchrun --nproc-per-node 8 -m stages.features --data D --out O --device cuda   (one shard per rank)
        python -m stages.features --data D --out O --merge                             (then merge them)

Regions are the annotation boxes (features.mode given_boxes, confidence 1.0), pooled from a C4 ResNet
with seeded random weights (params seed) on the embedded profile. Prints images per second at the end.
With features.mode detect, features.detector.checkpoint / labelmap set to `download` are fetched from the
downloads catalogue (downloads.vinvl_detector / vinvl_labelmap; params section downloads).

features.source vinvl_dump: no extraction; the existing VinVL feature folder features.dump_dir (features.tsv
+ .lineidx, predictions.tsv + .lineidx, imageid2idx.json; ALADIN.md 6.3) is checked (region length D+6 =
model.img_feature_dim, every image of the dataset present) and --out gets hard links to its five files
(copies where linking fails), so a 50 GB dump is not duplicated.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from aladin import extraction
from aladin.config import Params, load_params
from aladin.data import SPLITS, link_or_copy, load_karpathy
from aladin.features import feature_dim, region_dim
from aladin.io import PipelineError, atomic_path
from aladin.regions import RegionFeatures
from stages.common import run

SHOWN_FAILURES = 5
DUMP_FILES = ("features.tsv", "features.lineidx", "predictions.tsv", "predictions.lineidx", "imageid2idx.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.features", description=__doc__.split("\n")[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--data", required=True, help="dataset folder written by the data stage")
    p.add_argument("--out", required=True, help="output folder for the feature files")
    p.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--precision", choices=sorted(extraction.PRECISIONS), default="fp32",
                   help="fp32 (parity: TF32 off) or autocast to bf16/fp16 (default: fp32)")
    p.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK, else 0)")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of ranks (default: $WORLD_SIZE, else 1); with more than one, each rank "
                        "writes only its shard and --merge assembles --out")
    p.add_argument("--merge", action="store_true", help="merge the finished shards of --out into --out")
    p.add_argument("--on-error", choices=extraction.ON_ERROR, default="fail",
                   help="an unreadable image: fail (one error line, exit 1, no output) or record it in "
                        "failures.json and go on (default: fail)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none anyway when not a TTY)")
    return p.parse_args(argv)


class Progress:
    """`on_batch` callback drawing a tqdm bar on stderr; created at the first call, which carries the total."""

    def __init__(self, enabled: bool, desc: str):
        self.enabled, self.desc, self.bar = enabled, desc, None

    def __call__(self, handled: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:  # resumed images count from the start, not into the rate
            self.bar = tqdm(total=total, initial=handled, unit="img", desc=self.desc, file=sys.stderr,
                            dynamic_ncols=True)
        else:
            self.bar.update(handled - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def report_failures(outcome: extraction.Outcome) -> None:
    if not outcome.failures:
        return
    shown = "; ".join(f"{f['image_id']} ({f['file']}): {f['message']}" for f in outcome.failures[:SHOWN_FAILURES])
    more = f"; and {len(outcome.failures) - SHOWN_FAILURES} more" if len(outcome.failures) > SHOWN_FAILURES else ""
    print(f"warning: {len(outcome.failures)} images could not be read and have no features: {shown}{more}",
          file=sys.stderr)


def resolve_detector_files(params: Params) -> Params:
    """`params` with features.detector.checkpoint / labelmap `download` replaced by the fetched files' paths."""
    from aladin.download import fetch_param  # only detect mode with downloads needs it

    det = params.features.detector
    keys = {"checkpoint": "vinvl_detector", "labelmap": "vinvl_labelmap"}
    changes = {name: str(fetch_param(params.downloads, key)) for name, key in keys.items()
               if getattr(det, name) == "download"}
    if not changes:
        return params
    features = dataclasses.replace(params.features, detector=dataclasses.replace(det, **changes))
    return dataclasses.replace(params, features=features)


def install_dump(dump_dir: str | Path, data_dir: str | Path, out_dir: str | Path, img_feature_dim: int) -> int:
    """Check the VinVL feature folder `dump_dir` against the dataset and link its files into `out_dir`
    (replaced as a whole); returns the number of dataset images."""
    dump_dir = Path(dump_dir)
    for name in DUMP_FILES:
        if not (dump_dir / name).is_file():
            raise PipelineError(f"{dump_dir / name}: file not found (features.dump_dir must hold "
                                f"{', '.join(DUMP_FILES)})")
    dump = RegionFeatures(dump_dir, expected_dim=img_feature_dim)
    records = [r for split in SPLITS for r in load_karpathy(data_dir, split)]
    missing = [r for r in records if r.image_id not in dump]
    if missing:
        raise PipelineError(f"{dump.index_path}: image id {missing[0].image_id} ({missing[0].file_name}) of the "
                            f"dataset is not in the dump ({len(missing)} of {len(records)} images missing)")
    with atomic_path(out_dir, directory=True) as tmp:
        for name in DUMP_FILES:
            link_or_copy(dump_dir / name, tmp / name)
    return len(records)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        cfg = params.features
        if cfg.source == "vinvl_dump":
            if args.merge or extraction.resolve_rank(args.rank, args.world_size)[1] > 1:
                raise PipelineError("features.source is vinvl_dump: there is nothing to extract, shard or merge; "
                                    "run one process without --merge")
            n = install_dump(cfg.dump_dir, args.data, args.out, params.model.img_feature_dim)
            print(f"features: {n} images from the VinVL dump {cfg.dump_dir} (linked, not extracted) -> {args.out}")
            return 0
        if region_dim(cfg) != params.model.img_feature_dim:
            raise PipelineError(f"{args.params}: the extractor writes D+6 = {feature_dim(cfg)}+6 = "
                                f"{region_dim(cfg)} values per region (32 x features.stem_channels + 6) but "
                                f"model.img_feature_dim is {params.model.img_feature_dim}")
        plan = extraction.plan_dataset(args.data, params)
        if args.merge:
            root = extraction.shard_root(args.out)
            shards = sorted(root.glob("rank-*"))
            outcome = extraction.merge_shards(shards, args.out, plan.image_order)
            shutil.rmtree(root)
            report_failures(outcome)
            print(f"features: merged {len(shards)} shards, {outcome.written} images -> {args.out}")
            return 0
        if not (Path(args.data) / "images").is_dir():
            raise PipelineError(f"{args.data}: no images/ folder to extract features from (data.coco_images: "
                                "false?); use features.source vinvl_dump, or fetch the images")
        if cfg.mode == "detect":
            params = resolve_detector_files(params)
        rank, world_size = extraction.resolve_rank(args.rank, args.world_size)
        progress = Progress(not args.no_progress and sys.stderr.isatty(),
                            "features" if world_size == 1 else f"features rank {rank}")
        options = dict(num_workers=args.num_workers, device=args.device, precision=args.precision,
                       on_error=args.on_error, on_batch=progress, plan=plan)
        start = time.perf_counter()
        try:
            if world_size == 1:
                outcome = extraction.extract_dataset(args.data, args.out, params, **options)
                new, where = outcome.written - outcome.resumed, args.out
            else:
                where = extraction.shard_dir(args.out, rank)
                outcome = extraction.extract_shard(args.data, where, params, rank=rank, world_size=world_size,
                                                   **options)
                new = outcome.written
        finally:
            progress.close()
        seconds = time.perf_counter() - start
        if outcome.discarded_stale:
            print("features: discarded a shard left by a run with other settings", file=sys.stderr)
        report_failures(outcome)
        resumed = f", {outcome.resumed} resumed from an earlier run" if outcome.resumed else ""
        print(f"features: {new} images in {seconds:.1f} s ({new / max(seconds, 1e-9):.1f} images/s){resumed}"
              f" -> {where}")
        if world_size > 1:
            print(f"features: rank {rank} of {world_size} done; after every rank, run with --merge")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
