"""Benchmark of the region-feature detector: images/s and peak memory (VINVL.md 11).

Runs the VinVL X152-C4 detector (random weights: speed does not depend on their values) on pre-processed
images of 600 x 1000 pixels, the size VinVL's resize rule gives a 4:3 or wider photo, and prints the
throughput and the peak memory. Times only the model (backbone, RPN, RoIAlign, res5 head, predictor,
post-processing, attributes); image decoding runs in DataLoader workers in the real extractor.

Run     python -m aladin.benchmark_extractor                          # CPU, fp32, 2 images
        python -m aladin.benchmark_extractor --device cuda --precision bf16 --images 64 --batch-size 8
        python -m aladin.benchmark_extractor --tiny --images 4        # the small test configuration
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time

import torch

from .config import FeaturesConfig
from .detector import X152C4, DetectorConfig, build_detector

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TINY = FeaturesConfig(blocks=(1, 1, 1, 1), groups=1, width_per_group=64, stem_channels=8, min_size=96, max_size=160)


def run_benchmark(device: str, precision: str, n_images: int, batch_size: int, height: int, width: int,
                  tiny: bool = False, seed: int = 0) -> dict:
    """Time `n_images` random images through the detector after one warm-up batch; returns the figures."""
    config = (DetectorConfig(features=TINY, num_classes=8, num_attributes=6) if tiny
              else DetectorConfig(features=X152C4))
    model = build_detector(config, seed).to(device)
    if precision == "fp32" and device.startswith("cuda"):
        # parity mode: no TF32 anywhere (VINVL.md 8)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    autocast = (torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[precision])
                if DTYPES[precision] is not None else contextlib.nullcontext())
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(batch_size, 3, height, width, generator=generator).mul_(58.0).to(device)  # BGR - means
    sizes = [(height, width)] * batch_size

    def step():
        with torch.inference_mode(), autocast:
            model.detect_batch(batch, sizes)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up: allocator, cuDNN autotuning, first-call costs
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    batches = max(1, -(-n_images // batch_size))
    start = time.perf_counter()
    for _ in range(batches):
        step()
    seconds = time.perf_counter() - start
    result = {
        "model": "tiny" if tiny else "vinvl_x152c4", "device": device, "precision": precision,
        "image_size": [height, width], "batch_size": batch_size, "images": batches * batch_size,
        "seconds": seconds, "images_per_s": batches * batch_size / seconds,
        "threads": torch.get_num_threads(),
        # ru_maxrss is in KiB on Linux: the process's peak resident memory, model included
        "peak_host_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    if device.startswith("cuda"):
        result["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--height", type=int, default=600)
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--tiny", action="store_true", help="the small test configuration instead of X152-C4")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 1
    result = run_benchmark(args.device, args.precision, args.images, args.batch_size, args.height, args.width,
                           tiny=args.tiny)
    print(json.dumps(result, indent=2, sort_keys=True))
    print(f"{result['model']} on {args.device} ({args.precision}): {result['images_per_s']:.3f} images/s, "
          f"peak host memory {result['peak_host_memory_mib']:.0f} MiB"
          + (f", peak GPU memory {result['peak_gpu_memory_mib']:.0f} MiB" if "peak_gpu_memory_mib" in result else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
