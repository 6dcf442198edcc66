"""The report's tables and figures, built from the metric files the pipeline writes.

`notebooks/report.py` only calls these functions and displays what they return (STYLE.md 8.3), so the
tests here cover everything the report shows. Inputs are the evaluation metrics (`metrics/eval.json`),
the per-query latency (`metrics/latency.json`), the DVCLive folders of the two training stages and the
qualitative rankings (`eval/qualitative.json`). Figures are plain `matplotlib.figure.Figure` objects
built without pyplot (no global figure registry), and `save_figure` writes byte-identical PNGs for the
same inputs (DVC_AND_NOTEBOOKS.md 5.5).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.layout_engine import PlaceHolderLayoutEngine
from matplotlib.ticker import MaxNLocator
from PIL import Image

from aladin.io import PipelineError, atomic_path

CHANCE_HEAD = "chance (random ranking)"
RECALL_KEYS = ("r1", "r5", "r10")
RECALL_COLUMNS = [f"{d} R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
TABLE_COLUMNS = ["head", "protocol", "n_images", "n_folds", *RECALL_COLUMNS, "rsum"]
NON_HEAD_KEYS = ("schema_version", "dataset", "split")
SUPPORTED_SCHEMA = 1
LATENCY_PROTOCOL = "coco_5k"  # the whole test split: the gallery the latency stage times against

# The paper's efficiency plot, mesnico/ALADIN alad/plots/plot_efficiency_vs_effectiveness.py (commit
# d1bd7bf; PAPER_NUMBERS.md 1.3): latency in seconds for 5 queries, rsum most likely t2i R@1+R@5+R@10
# on COCO 5K (inferred). Only the ratios between the two heads are comparable with a scaled-down run.
PAPER_EFFICIENCY = {
    "alignment": {"latency_s": 0.098 * 5, "rsum": 224.0},  # "ALADIN A/ft."
    "matching": {"latency_s": 0.023 * 5, "rsum": 215.0},  # "ALADIN A/ft. + D/ft."
}


def set_theme() -> None:
    """One look for every figure (DVC_AND_NOTEBOOKS.md 6.2). Call before building figures."""
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind")


def _get(mapping, keys: Iterable[str], source: str):
    """`mapping[k1][k2]...`, or a PipelineError naming the dotted key that is missing."""
    value, path = mapping, []
    for key in keys:
        path.append(str(key))
        if not isinstance(value, dict) or key not in value:
            raise PipelineError(f"{source}: missing key '{'.'.join(path)}'")
        value = value[key]
    return value


def _number(mapping, keys: Iterable[str], source: str) -> float:
    keys = list(keys)
    value = _get(mapping, keys, source)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PipelineError(f"{source}: '{'.'.join(keys)}' must be a number, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------------
# Tables


def _head_order(head: str) -> tuple[str, int]:
    """alignment, matching, then rerank@k by numeric k (rerank@10 before rerank@50 before rerank@100)."""
    name, _, k = head.partition("@")
    return (name, int(k) if k.isdigit() else 0)


def heads_of(eval_metrics: dict, source: str = "eval metrics") -> list[str]:
    """The evaluated heads, sorted (alignment, matching, rerank@k by k); checks the schema version."""
    version = _get(eval_metrics, ["schema_version"], source)
    if version != SUPPORTED_SCHEMA:
        raise PipelineError(f"{source}: schema_version {version!r} is not supported (expected {SUPPORTED_SCHEMA})")
    heads = sorted((k for k, v in eval_metrics.items() if k not in NON_HEAD_KEYS and isinstance(v, dict)),
                   key=_head_order)
    if not heads:
        raise PipelineError(f"{source}: no head records (expected keys such as 'matching', 'alignment')")
    return heads


def _row(head: str, protocol: str, n_images: int, n_folds: int, root: dict, prefix: list[str],
         source: str) -> dict:
    """A table row from the record at `root[prefix...]`; a missing number names its full dotted key."""
    row = {"head": head, "protocol": protocol, "n_images": n_images, "n_folds": n_folds}
    for direction in ("i2t", "t2i"):
        for k, name in zip(RECALL_KEYS, ("R@1", "R@5", "R@10")):
            row[f"{direction} {name}"] = _number(root, prefix + [direction, k], source)
    row["rsum"] = _number(root, prefix + ["rsum"], source)
    return row


def build_results_table(eval_metrics: dict, source: str = "eval metrics") -> pd.DataFrame:
    """One row per (head, protocol) plus one chance row per protocol, recalls in percent.

    Rows are grouped by protocol (sorted: coco_1k_5fold, coco_5k), heads sorted within a protocol and the
    chance row last, so a reader sees how far above random ranking each head is. For coco_1k_5fold the
    numbers are the means over folds, as eval.json stores them. Chance depends on the gallery sizes
    only, so it is read from the first head's record.
    """
    rows = []
    heads = heads_of(eval_metrics, source)
    protocols = sorted({p for h in heads for p in eval_metrics[h]})
    for protocol in protocols:
        sizes = []
        for head in heads:
            prefix = [head, protocol]
            n_images = int(_number(eval_metrics, prefix + ["n_images"], source))
            n_folds = int(_number(eval_metrics, prefix + ["n_folds"], source))
            rows.append(_row(head, protocol, n_images, n_folds, eval_metrics, prefix, source))
            sizes.append((n_images, n_folds))
        rows.append(_row(CHANCE_HEAD, protocol, *sizes[0], eval_metrics, [heads[0], protocol, "chance"], source))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def format_table(table: pd.DataFrame, decimals: int = 1) -> pd.DataFrame:
    """The table as the report shows it: recalls and rsum as strings with `decimals` places."""
    shown = table.copy()
    for column in [*RECALL_COLUMNS, "rsum"]:
        shown[column] = [f"{v:.{decimals}f}" for v in table[column]]
    return shown


def write_tables(table: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """`results.csv` (full precision, for diffs across commits) and `results.md` when tabulate exists."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.csv"]
    with atomic_path(written[0]) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    try:
        import tabulate  # noqa: F401  (optional: DataFrame.to_markdown needs it)
    except ImportError:
        return written
    written.append(out_dir / "results.md")
    with atomic_path(written[1]) as tmp:
        shown = format_table(table)
        align = ["left", "left"] + ["right"] * (len(shown.columns) - 2)  # head, protocol, then numbers
        tmp.write_text(shown.to_markdown(index=False, disable_numparse=True, colalign=align) + "\n")
    return written


def latency_table(eval_metrics: dict, latency: dict, protocol: str = LATENCY_PROTOCOL,
                  source: str = "latency") -> pd.DataFrame:
    """Per head: median and p95 text-to-image latency per query (ms) next to its rsum on `protocol`."""
    rows = []
    for head in heads_of(eval_metrics):
        if head not in latency:
            raise PipelineError(f"{source}: missing key '{head}' (the head is in the eval metrics)")
        median = _number(latency, [head, "t2i", "median_ms"], source)
        if not median > 0:
            raise PipelineError(f"{source}: '{head}.t2i.median_ms' must be positive, got {median}")
        row = {"head": head, "t2i median ms": median,
               "t2i p95 ms": _number(latency, [head, "t2i", "p95_ms"], source)}
        if "search_median_ms" in latency[head]["t2i"]:  # the search alone, without query encoding
            row["t2i search ms"] = _number(latency, [head, "t2i", "search_median_ms"], source)
        row["rsum"] = _number(eval_metrics, [head, protocol, "rsum"], "eval metrics")
        rows.append(row)
    return pd.DataFrame(rows).set_index("head")


def headline(eval_metrics: dict, latency: dict, protocol: str = LATENCY_PROTOCOL) -> str:
    """One sentence: how much rsum the matching head keeps, at how much lower latency, vs the paper."""
    lat = latency_table(eval_metrics, latency, protocol)
    for head in ("alignment", "matching"):
        if head not in lat.index:
            raise PipelineError(f"eval metrics: the headline needs the '{head}' head")
    kept = 100.0 * lat.loc["matching", "rsum"] / lat.loc["alignment", "rsum"]
    speedup = lat.loc["alignment", "t2i median ms"] / lat.loc["matching", "t2i median ms"]
    paper_kept = 100.0 * PAPER_EFFICIENCY["matching"]["rsum"] / PAPER_EFFICIENCY["alignment"]["rsum"]
    paper_speedup = PAPER_EFFICIENCY["alignment"]["latency_s"] / PAPER_EFFICIENCY["matching"]["latency_s"]
    search = ""
    if "t2i search ms" in lat.columns:
        ratio = lat.loc["alignment", "t2i search ms"] / lat.loc["matching", "t2i search ms"]
        search = f" (query encoding included; the search alone is {ratio:.1f}x faster)"
    return (f"On {protocol}, the distilled matching head keeps {kept:.1f}% of the alignment head's rsum "
            f"({lat.loc['matching', 'rsum']:.1f} vs {lat.loc['alignment', 'rsum']:.1f}) at "
            f"{speedup:.1f}x lower median text-to-image latency per query{search}. The paper's efficiency "
            f"plot (COCO 5K) puts it at {paper_kept:.1f}% of the rsum at {paper_speedup:.1f}x lower latency.")


# ---------------------------------------------------------------------------------------------------
# Training history (DVCLive)


def _read_tsv(path: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one DVCLive TSV: header `[timestamp] step <name>`, NaN/inf as strings."""
    column = metric.rsplit("/", 1)[-1]
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if reader.fieldnames is None or "step" not in reader.fieldnames or column not in reader.fieldnames:
            raise PipelineError(f"{path}:1: header must have columns 'step' and '{column}', got {reader.fieldnames}")
        pairs = []
        for line, record in enumerate(reader, start=2):
            try:
                pairs.append((int(record["step"]), float(record[column])))
            except (TypeError, ValueError):
                raise PipelineError(f"{path}:{line}: step must be an integer and {column} a number") from None
    return pairs


def load_dvclive_history(live_dir: str | Path) -> pd.DataFrame:
    """Every metric history under `<live_dir>/plots/metrics`, long form: stage, metric, step, value.

    The stage is the folder name (`dvclive/train_distill` -> `train_distill`), the metric the TSV's path
    relative to plots/metrics without `.tsv` (`val/alignment/rsum`); a step is one epoch. A resumed run
    may log a step twice; the later row wins, as it is the one the checkpoint continued from.
    """
    live_dir = Path(live_dir)
    root = live_dir / "plots" / "metrics"
    if not root.is_dir():
        raise PipelineError(f"{root}: DVCLive metrics folder not found")
    frames = []
    for path in sorted(root.rglob("*.tsv")):
        metric = path.relative_to(root).with_suffix("").as_posix()
        pairs = _read_tsv(path, metric)
        frame = pd.DataFrame(pairs, columns=["step", "value"]).drop_duplicates("step", keep="last")
        frame.insert(0, "metric", metric)
        frames.append(frame)
    if not frames:
        raise PipelineError(f"{root}: no .tsv metric histories")
    history = pd.concat(frames, ignore_index=True)
    history.insert(0, "stage", live_dir.name)
    return history.sort_values(["metric", "step"], kind="stable", ignore_index=True)


def load_histories(live_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """`load_dvclive_history` of several stages, concatenated in the given order."""
    frames = [load_dvclive_history(d) for d in live_dirs]
    if not frames:
        raise PipelineError("no DVCLive folders given")
    return pd.concat(frames, ignore_index=True)


def plot_training_curves(history: pd.DataFrame) -> Figure:
    """Training loss (top row) and validation rsum of each head (bottom row), one column per stage."""
    is_loss = history["metric"] == "train/loss"
    is_rsum = history["metric"].str.startswith("val/") & history["metric"].str.endswith("rsum")
    if not (is_loss | is_rsum).any():
        raise PipelineError("training history has neither 'train/loss' nor 'val/.../rsum' metrics")
    stages = list(dict.fromkeys(history["stage"]))  # first-seen order
    fig = Figure(figsize=(3.2 * len(stages), 4.6), layout="constrained")
    axes = fig.subplots(2, len(stages), sharex="col", sharey="row", squeeze=False)
    rsum_metrics = sorted(history.loc[is_rsum, "metric"].unique())
    palette = dict(zip(rsum_metrics, sns.color_palette(n_colors=len(rsum_metrics))))
    for col, stage in enumerate(stages):
        top, bottom = axes[0, col], axes[1, col]
        loss = history[(history["stage"] == stage) & is_loss]
        rsum = history[(history["stage"] == stage) & is_rsum]
        if not loss.empty:
            sns.lineplot(data=loss, x="step", y="value", marker="o", ax=top)
        if not rsum.empty:
            sns.lineplot(data=rsum, x="step", y="value", hue="metric", palette=palette, marker="o",
                         ax=bottom, legend=col == len(stages) - 1)
        top.set(title=stage, xlabel="", ylabel="training loss" if col == 0 else "")
        bottom.set(xlabel="epoch", ylabel="validation rsum" if col == 0 else "")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole epochs
    legend = axes[1, -1].get_legend()
    if legend is not None:
        legend.set_title("")
    return fig


# ---------------------------------------------------------------------------------------------------
# Efficiency


def plot_latency_vs_rsum(eval_metrics: dict, latency: dict, protocol: str = LATENCY_PROTOCOL) -> Figure:
    """rsum on `protocol` against median per-query t2i latency (ms, log x), one labelled point per head.

    The paper's Figure plots the same two axes (mesnico/ALADIN plot_efficiency_vs_effectiveness.py).
    """
    points = latency_table(eval_metrics, latency, protocol).reset_index()
    fig = Figure(figsize=(4.2, 3.2), layout="constrained")
    ax = fig.subplots()
    sns.scatterplot(data=points, x="t2i median ms", y="rsum", hue="head", s=70, ax=ax, legend=False)
    for _, p in points.iterrows():
        ax.annotate(p["head"], (p["t2i median ms"], p["rsum"]), xytext=(6, 4), textcoords="offset points")
    ax.set_xscale("log")
    low, high = points["t2i median ms"].min(), points["t2i median ms"].max()
    ax.set_xlim(low / 3, high * 3)  # room for the labels on a log axis
    ax.margins(y=0.2)
    ax.set(xlabel="median latency per text query, t2i (ms, log scale)", ylabel=f"rsum ({protocol})")
    return fig


# ---------------------------------------------------------------------------------------------------
# Qualitative rankings


def _load_image(qualitative: dict, image_id: int, dataset_dir: Path, source: str) -> np.ndarray:
    relative = _get(qualitative, ["images", str(image_id)], source)
    path = dataset_dir / relative
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
    except FileNotFoundError:
        raise PipelineError(f"{path}: image not found (qualitative images.{image_id})") from None
    except OSError as e:
        raise PipelineError(f"{path}: cannot read image ({e})") from None


def plot_qualitative(qualitative: dict, dataset_dir: str | Path, head: str = "matching",
                     top_k: int | None = None, source: str = "qualitative") -> Figure:
    """One row per caption query: the head's top-k images, the ground truth framed green, others grey.

    `top_k` defaults to the file's `top_k`; asking for more than the file ranked is an error, not a
    silently shorter row. When the ground truth is not among the top k, the row title says so.
    """
    dataset_dir = Path(dataset_dir)
    stored_k = int(_number(qualitative, ["top_k"], source))
    top_k = stored_k if top_k is None else int(top_k)
    if not 1 <= top_k <= stored_k:
        raise PipelineError(f"{source}: top_k {top_k} requested but the file ranks top_k = {stored_k}")
    queries = _get(qualitative, ["queries"], source)
    if not isinstance(queries, list) or not queries:
        raise PipelineError(f"{source}: 'queries' must be a non-empty list")
    fig = Figure(figsize=(1.5 * top_k, 1.75 * len(queries)), layout="constrained")
    # One subfigure per query, so a long caption title spans its row instead of widening column 0.
    rows = fig.subfigures(len(queries), 1, squeeze=False)[:, 0]
    for row, query in enumerate(queries):
        where = f"{source}: queries[{row}]"
        caption = _get(query, ["caption"], where)
        truth = int(_number(query, ["image_id"], where))
        ranked = _get(query, [head], where)
        if not isinstance(ranked, list) or len(ranked) < top_k:
            raise PipelineError(f"{where}.{head} must list at least {top_k} image ids")
        ranked = [int(i) for i in ranked[:top_k]]
        title = f'"{caption}"' + ("" if truth in ranked else f"  (ground truth {truth} not in top {top_k})")
        axes = rows[row].subplots(1, top_k, squeeze=False)[0]
        for col, image_id in enumerate(ranked):
            ax = axes[col]
            ax.imshow(_load_image(qualitative, image_id, dataset_dir, source))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            colour, width = ("#2ca02c", 4.0) if image_id == truth else ("0.6", 1.5)
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_edgecolor(colour)
                spine.set_linewidth(width)
            ax.set_xlabel(f"#{col + 1}  id {image_id}", fontsize=7)
        rows[row].suptitle(title, x=0.01, ha="left", fontsize=8)
    fig.suptitle(f"Top-{top_k} images per caption, {head} head (green frame: ground truth)", fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------------
# Output


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write `fig` as PNG, atomically; no Software/time metadata, so equal figures give equal bytes.

    Freezes the figure's layout on the first save (later saves of the same figure give the same bytes).
    """
    path = Path(path)
    if not isinstance(fig.get_layout_engine(), PlaceHolderLayoutEngine):
        # Constrained layout refines itself on every draw, so a second save would differ from the
        # first; lay the figure out once at the output dpi and freeze the positions.
        fig.set_dpi(dpi)
        fig.draw_without_rendering()
        fig.set_layout_engine("none")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
    return path

