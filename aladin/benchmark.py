"""The efficiency claim, measured: per-query latency of every retrieval mode, the cross-encoder's cost,
alignment-head throughput, and how matching-head search grows with the gallery (ALADIN.md 8).

The paper's "almost 90 times faster" is 2.06 / 0.023, two constants typed into a plotting script
(PAPER_NUMBERS.md 8). Here every figure comes from one run on one device:

- latency per text query (t2i) at the test gallery for the matching head (kNN), the alignment head
  (brute force) and re-ranking (`rerank@k`), query encoding included and also stated apart; the gallery
  is encoded beforehand and its cost is stated separately;
- the VinVL-style cross-encoder (aladin.crossencoder): the per-pair forward timed on a sample, times the
  gallery size (one forward per image for a text query);
- `speedup`: ratios of those median latencies (same gallery, same device);
- the alignment head's scoring throughput (pairs/s) beside a plain matmul with the same multiply-adds;
- a gallery-size sweep of the matching head with synthetic unit vectors of the model's dimension through
  FAISS on the CPU (faiss-cpu, also in a GPU run): exact inner product (IndexFlatIP) and IVF-Flat, whose nprobe is the smallest power of two that
  reaches the target recall@10 against exact search on calibration queries; recall and latency are then
  measured on other queries.

Timings vary between runs; nothing here is asserted by a test.
"""
from __future__ import annotations

import math
import platform
import statistics
import time

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from .config import BenchmarkConfig
from .crossencoder import CrossEncoder, query_latency, time_crossencoder
from .model import Aladin, AlignmentSet
from .paper_numbers import paper_speedups
from .retrieval import EncodedSplit, encode_images, encode_texts, measure_latency, percentile, split_to, subset, synchronize
from .splits import SplitInputs

SCHEMA_VERSION = 1
K = 10  # recall@10 of the approximate index; top-10 for every search
# The synthetic gallery: a random linear map of a SWEEP_INTRINSIC_DIM-dimensional standard Gaussian plus
# isotropic noise (norm ~SWEEP_NOISE of the signal's), normalised. Uniform random unit vectors would have
# no neighbourhood structure for an approximate index to use; real embeddings have a low intrinsic
# dimension. A mixture of a fixed number of clusters was rejected: once the IVF list count reaches the
# cluster count, lists and clusters coincide and one probe finds everything, which flatters the index.
SWEEP_INTRINSIC_DIM = 16
SWEEP_NOISE = 0.3
THROUGHPUT_IMAGES = 128  # images of the test gallery scored against every caption for the pairs/s figure
# Alignment-head throughput on random tokens at the paper's sizes: hidden 768, 34 regions minus the first
# (Q5), captions of up to 50 wordpieces minus [CLS], [SEP] and the last (Q6).
PAPER_WIDTH = {"hidden": 768, "regions": 33, "words": 47, "images": 32, "captions": 1000}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"benchmark.device is {name!r} but CUDA is not available")
    return torch.device(name)


def device_info(device: torch.device) -> dict:
    processor = platform.processor() or platform.machine()
    return {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else processor,
            "processor": processor, "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
            "torch_version": torch.__version__, "faiss_version": faiss.__version__}


# ---------------------------------------------------------------------------------------------------
# Costs at the test gallery


def encode_timed(model: Aladin, split: SplitInputs, batch_size: int) -> tuple[EncodedSplit, dict]:
    """The gallery encoding (both heads' outputs, in batches) and its offline cost per modality."""
    device = split.texts.input_ids.device
    encode_images(model, split.images[:batch_size], batch_size)  # warm-up
    parts, cost = [], {}
    for name, fn, items in (("images", encode_images, split.images), ("captions", encode_texts, split.texts)):
        synchronize(device)
        start = time.perf_counter()
        parts.append(fn(model, items, batch_size))
        synchronize(device)
        total = time.perf_counter() - start
        cost[name] = {"total_s": total, "ms_per_item": 1000.0 * total / len(items), "n": len(items),
                      "batch_size": batch_size}
    (img_emb, img_set), (txt_emb, txt_set) = parts
    return EncodedSplit(img_emb, txt_emb, img_set, txt_set), cost


@torch.inference_mode()
def alignment_throughput(model: Aladin, img: AlignmentSet, txt: AlignmentSet, chunk_size: int) -> dict:
    """Pairs/s of the alignment head scoring every image of `img` against every caption of `txt`, and of a
    plain matmul of the same size, in the same run.

    The matmul multiplies the same token blocks, (chunk x R', H) by (H, chunk x W'), with the same
    chunking, so it does the alignment head's multiply-adds without its masking and max/sum reduction.
    """
    n_img, n_txt = img.tokens.shape[0], txt.tokens.shape[0]
    device = img.tokens.device

    def align():
        model.alignment_scores(img, txt, chunk_size)

    def matmul():
        for i in range(0, n_img, chunk_size):
            a = img.tokens[i: i + chunk_size].flatten(0, 1)  # (ci * R', H)
            for j in range(0, n_txt, chunk_size):
                a @ txt.tokens[j: j + chunk_size].flatten(0, 1).T  # (ci * R', cj * W')

    first = torch.arange(min(chunk_size, n_img, n_txt), device=device)
    model.alignment_scores(subset(img, first), subset(txt, first), chunk_size)  # warm-up
    out = {}
    for name, fn in (("alignment", align), ("matmul", matmul)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        out[f"{name}_s"] = time.perf_counter() - start
        out[f"{name}_pairs_per_s"] = n_img * n_txt / out[f"{name}_s"]
    out["matmul_over_alignment"] = out["matmul_pairs_per_s"] / out["alignment_pairs_per_s"]
    out.update(n_images=n_img, n_captions=n_txt, chunk_size=chunk_size, hidden=int(img.tokens.shape[2]),
               region_tokens=int(img.tokens.shape[1]), word_tokens=int(txt.tokens.shape[1]))
    return out


def random_alignment_set(n: int, width: int, hidden: int, generator: torch.Generator,
                         device: torch.device) -> AlignmentSet:
    """Unit tokens `(n, width, hidden)`, each item keeping a random 50..100% of its slots (at least one)."""
    tokens = F.normalize(torch.randn(n, width, hidden, generator=generator), dim=-1)
    lengths = torch.randint(width // 2, width + 1, (n,), generator=generator).clamp(min=1)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return AlignmentSet(tokens.to(device), mask.to(device))


# ---------------------------------------------------------------------------------------------------
# Gallery-size sweep (FAISS)


def sweep_sizes(smallest: int, largest: int) -> list[int]:
    """smallest, 10x smallest, 100x ... below largest, then largest: 500 -> [500, 5000, 50000, 100000]."""
    if smallest < 1 or largest < smallest:
        raise ValueError(f"need 1 <= smallest <= largest, got {smallest}, {largest}")
    sizes = [smallest]
    while sizes[-1] * 10 < largest:
        sizes.append(sizes[-1] * 10)
    if sizes[-1] != largest:
        sizes.append(largest)
    return sizes


def synthetic_basis(dim: int, rng: np.random.Generator) -> np.ndarray:
    """The random linear map `[d, dim]` (d = min(SWEEP_INTRINSIC_DIM, dim)) shared by a gallery and its queries."""
    d = min(SWEEP_INTRINSIC_DIM, dim)
    return rng.standard_normal((d, dim)) / math.sqrt(d)


def synthetic_unit_vectors(n: int, dim: int, rng: np.random.Generator, basis: np.ndarray,
                           block: int = 100_000) -> np.ndarray:
    """float32 `[n, dim]` unit vectors: z @ basis + noise, z ~ N(0, I_d), normalised (see SWEEP_NOISE)."""
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, block):
        m = min(block, n - s)
        x = rng.standard_normal((m, basis.shape[0])) @ basis + SWEEP_NOISE * rng.standard_normal((m, dim)) / math.sqrt(dim)
        out[s: s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int = K) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k (FAISS pads missing results with -1)."""
    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist()) - {-1}) for a, e in zip(approx, exact)]
    return float(np.mean(hits) / k)


def _time_single_queries(index, queries: np.ndarray, k: int) -> tuple[float, float]:
    """Median and p95 ms of one-query searches (a query arrives alone)."""
    index.search(queries[:1], k)  # warm-up
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None, :], k)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times), percentile(times, 0.95)


def ivf_index(xb: np.ndarray, nlist: int, seed: int) -> faiss.IndexIVFFlat:
    """IVF-Flat, inner product; k-means on at most 64 x nlist vectors of the gallery (seeded)."""
    dim = xb.shape[1]
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.min_points_per_centroid = 1  # small galleries train on what they have, without a warning
    rng = np.random.default_rng(seed)
    sample = xb if len(xb) <= 64 * nlist else xb[np.sort(rng.choice(len(xb), 64 * nlist, replace=False))]
    index.train(sample)
    index.add(xb)
    return index  # faiss's Python wrapper keeps `quantizer` referenced by `index`


def gallery_sweep(dim: int, sizes: list[int], n_queries: int, timed_queries: int, target_recall: float,
                  seed: int = 0) -> dict:
    """Exact and IVF search cost per gallery size on synthetic vectors; keyed by str(size) for DVC.

    Per size: `exact_median_ms`/`exact_p95_ms` (IndexFlatIP), `approx_*` (IVF-Flat with nlist = sqrt(n)),
    `nlist`, `nprobe`, `recall_at_10` (approx against exact, on queries not used to choose nprobe),
    `calibration_recall_at_10`, `build_s` (k-means and adding the vectors).
    """
    rng = np.random.default_rng(seed)
    basis = synthetic_basis(dim, rng)
    base = synthetic_unit_vectors(max(sizes), dim, rng, basis)  # smaller galleries are its prefixes
    calib = synthetic_unit_vectors(n_queries, dim, rng, basis)
    queries = synthetic_unit_vectors(n_queries, dim, rng, basis)
    timed = queries[:timed_queries]
    out = {}
    for n in sizes:
        xb = base[:n]
        exact = faiss.IndexFlatIP(dim)
        exact.add(xb)
        k = min(K, n)
        truth_calib, truth = exact.search(calib, k)[1], exact.search(queries, k)[1]
        exact_median, exact_p95 = _time_single_queries(exact, timed, k)
        del exact
        nlist = max(1, round(math.sqrt(n)))
        start = time.perf_counter()
        ivf = ivf_index(xb, nlist, seed)
        build_s = time.perf_counter() - start
        nprobe = 1
        while True:
            ivf.nprobe = nprobe
            calib_recall = recall_at_k(ivf.search(calib, k)[1], truth_calib, k)
            if calib_recall >= target_recall or nprobe >= nlist:
                break
            nprobe = min(nlist, nprobe * 2)
        recall = recall_at_k(ivf.search(queries, k)[1], truth, k)
        approx_median, approx_p95 = _time_single_queries(ivf, timed, k)
        out[str(n)] = {"n": n, "exact_median_ms": exact_median, "exact_p95_ms": exact_p95,
                       "approx_median_ms": approx_median, "approx_p95_ms": approx_p95,
                       "recall_at_10": recall, "calibration_recall_at_10": calib_recall,
                       "nlist": nlist, "nprobe": nprobe, "build_s": build_s}
        del ivf
    return {"dim": dim, "index": "IVF-Flat (inner product), nlist = round(sqrt(n))",
            "data": f"synthetic: a random linear map of a {basis.shape[0]}-d standard Gaussian plus isotropic "
                    f"noise (relative norm ~{SWEEP_NOISE}), normalised; queries drawn the same way", "queries": n_queries, "timed_queries": len(timed),
            "target_recall_at_10": target_recall, "sizes": out}


@torch.inference_mode()
def alignment_search_ms(model: Aladin, enc: EncodedSplit, n: int, n_queries: int, chunk_size: int) -> float:
    """Median alignment-head search time (ms) of one caption query against a gallery of `n` images: the
    test gallery's region tokens repeated up to `n` (real shapes and values; brute force costs the same
    whatever the images), scored in chunks, then top-10. Query encoding excluded (the caller adds it)."""
    device = enc.img_emb.device
    gallery = subset(enc.img_set, torch.arange(n, device=device) % enc.img_emb.shape[0])  # (n, L', H)
    times = []
    for i in range(-1, min(n_queries, enc.txt_emb.shape[0])):  # query -1: warm-up, not timed
        query = subset(enc.txt_set, torch.tensor([max(i, 0)], device=device))
        synchronize(device)
        start = time.perf_counter()
        scores = model.alignment_scores(gallery, query, chunk_size)[:, 0]  # (n,)
        torch.topk(scores, min(K, n))
        synchronize(device)
        if i >= 0:
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------
# The whole benchmark


def run_benchmark(model: Aladin, split: SplitInputs, settings: BenchmarkConfig, batch_size: int,
                  chunk_size: int, seed: int = 0) -> dict:
    """Every figure of metrics/benchmark.json (see the module docstring); `split` is the test split.

    With `settings.threads` > 0 torch and FAISS run that many CPU threads for the whole benchmark (then
    restored). One thread is the default: a single query of a small model gains little from intra-op
    threads, and on a shared machine their barriers wait for descheduled threads, which turns into
    latency spikes of a scheduler tick (measured here: 6 ms median with 2 threads, 2 ms with 1, for the
    same caption encoding, while another process was running).
    """
    if settings.threads < 0:
        raise ValueError(f"benchmark.threads must be >= 0, got {settings.threads}")
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
        faiss.omp_set_num_threads(settings.threads)
    try:
        return _run(model, split, settings, batch_size, chunk_size, seed)
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


def _run(model: Aladin, split: SplitInputs, settings: BenchmarkConfig, batch_size: int, chunk_size: int,
         seed: int) -> dict:
    device = resolve_device(settings.device)
    model = model.to(device).eval()
    split = split_to(split, device)
    n_images, n_captions = len(split.images), len(split.texts)

    enc, encoding = encode_timed(model, split, batch_size)  # the gallery, encoded once
    latency = {mode: d["t2i"] for mode, d in measure_latency(
        model, split, enc, settings.latency_queries, chunk_size, rerank_k=settings.rerank_k,
        directions=("t2i",)).items()}
    cross_timing = time_crossencoder(CrossEncoder(model.backbone, seed).to(device).eval(), split.texts,
                                     split.images, settings.crossencoder_pairs, settings.crossencoder_batch_size, seed)
    latency["crossencoder"] = query_latency(cross_timing, n_images)
    # the test gallery's own tokens (its first THROUGHPUT_IMAGES images against every caption), and random
    # tokens at the paper's sizes, where the multiply-adds outweigh the reductions
    throughput = alignment_throughput(
        model, subset(enc.img_set, torch.arange(min(THROUGHPUT_IMAGES, n_images), device=device)), enc.txt_set,
        chunk_size)
    generator = torch.Generator().manual_seed(seed)
    paper_width = alignment_throughput(
        model, random_alignment_set(PAPER_WIDTH["images"], PAPER_WIDTH["regions"], PAPER_WIDTH["hidden"], generator, device),
        random_alignment_set(PAPER_WIDTH["captions"], PAPER_WIDTH["words"], PAPER_WIDTH["hidden"], generator, device),
        chunk_size)

    dim = int(enc.img_emb.shape[1])
    sweep = gallery_sweep(dim, sweep_sizes(n_images, max(n_images, settings.sweep_max)), settings.sweep_queries,
                          settings.sweep_timed_queries, settings.sweep_target_recall, seed)
    query_ms = latency["matching"]["encode_median_ms"]
    for row in sweep["sizes"].values():
        # the cross-encoder at this gallery size against query encoding + exact kNN at this size
        row["crossencoder_ms"] = cross_timing["per_pair_ms"] * row["n"]
        row["matching_ms"] = query_ms + row["exact_median_ms"]
        row["speedup_vs_crossencoder"] = row["crossencoder_ms"] / row["matching_ms"]
        if row["n"] <= settings.alignment_sweep_max:
            search_ms = alignment_search_ms(model, enc, row["n"], settings.sweep_timed_queries, chunk_size)
            row["alignment_ms"] = latency["alignment"]["encode_median_ms"] + search_ms
            row["alignment_search_ms"] = search_ms
            row["matching_vs_alignment"] = row["alignment_ms"] / row["matching_ms"]

    median = {mode: v["median_ms"] for mode, v in latency.items()}
    return {
        "schema_version": SCHEMA_VERSION,
        "device": device_info(device),
        "gallery": {"n_images": n_images, "n_captions": n_captions, "direction": "t2i",
                    "latency": "per text query, query encoding included (encode_* alone, search_* alone); "
                               "gallery encoded beforehand (encoding)"},
        "latency": latency,
        "encoding": {**encoding, "query": {mode: latency[mode]["encode_median_ms"] for mode in latency
                                           if "encode_median_ms" in latency[mode]}},
        "crossencoder": cross_timing,
        "speedup_search": {"matching_vs_alignment": latency["alignment"]["search_median_ms"]
                                                    / latency["matching"]["search_median_ms"]},
        "speedup": {"matching_vs_crossencoder": median["crossencoder"] / median["matching"],
                    "matching_vs_alignment": median["alignment"] / median["matching"],
                    "alignment_vs_crossencoder": median["crossencoder"] / median["alignment"],
                    **{f"{m}_vs_crossencoder": median["crossencoder"] / median[m]
                       for m in median if m.startswith("rerank@")}},
        "paper": paper_speedups(),
        "alignment_throughput": throughput,
        "alignment_throughput_paper_width": paper_width,
        "sweep": sweep,
    }


def headline(bench: dict) -> list[str]:
    """The figures the issue asks for, one per line."""
    lat, sp, th = bench["latency"], bench["speedup"], bench["alignment_throughput"]
    pw = bench["alignment_throughput_paper_width"]
    n = bench["gallery"]["n_images"]
    largest = bench["sweep"]["sizes"][max(bench["sweep"]["sizes"], key=int)]
    lines = [
        f"device: {bench['device']['type']} ({bench['device']['name']}), torch threads {bench['device']['torch_threads']}, "
        f"FAISS threads {bench['device']['faiss_threads']}",
        f"per text query over {n} images (query encoding included): matching {lat['matching']['median_ms']:.3f} ms, "
        f"alignment {lat['alignment']['median_ms']:.3f} ms, cross-encoder {lat['crossencoder']['median_ms']:.1f} ms "
        f"(extrapolated from {bench['crossencoder']['n_pairs']} pairs)",
        f"matching vs cross-encoder {sp['matching_vs_crossencoder']:.1f}x (paper 89.6x), matching vs alignment "
        f"{sp['matching_vs_alignment']:.1f}x (paper 4.3x), alignment vs cross-encoder "
        f"{sp['alignment_vs_crossencoder']:.1f}x (paper 21.0x)",
        *(f"{m}: {lat[m]['median_ms']:.3f} ms/query" for m in lat if m.startswith("rerank@")),
        f"alignment head {th['alignment_pairs_per_s']:.3g} pairs/s vs plain matmul {th['matmul_pairs_per_s']:.3g} "
        f"pairs/s ({th['matmul_over_alignment']:.1f}x); at the paper's width (random tokens, hidden "
        f"{pw['hidden']}) {pw['alignment_pairs_per_s']:.3g} vs {pw['matmul_pairs_per_s']:.3g} "
        f"({pw['matmul_over_alignment']:.1f}x)",
        *(f"at {row['n']} images: matching {row['matching_ms']:.2f} ms, alignment {row['alignment_ms']:.2f} ms, "
          f"cross-encoder {row['crossencoder_ms']:.0f} ms per query: matching vs alignment "
          f"{row['matching_vs_alignment']:.1f}x, vs cross-encoder {row['speedup_vs_crossencoder']:.0f}x"
          for row in sorted(bench["sweep"]["sizes"].values(), key=lambda r: r["n"]) if "alignment_ms" in row),
        f"{largest['n']} synthetic vectors (dim {bench['sweep']['dim']}): exact {largest['exact_median_ms']:.2f} ms/query, "
        f"IVF nprobe {largest['nprobe']}/{largest['nlist']} {largest['approx_median_ms']:.2f} ms/query at recall@10 "
        f"{largest['recall_at_10']:.3f}",
    ]
    return lines
