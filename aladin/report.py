"""The report's tables and figures, built from the metric files the pipeline writes.

`notebooks/report.py` only calls these functions and displays what they return (STYLE.md 8.3), so the
tests here cover everything the report shows. Inputs are the evaluation metrics (`metrics/eval.json`),
the benchmark stage's measured costs (`metrics/benchmark.json`), the DVCLive folders of the two training
stages, the qualitative rankings (`eval/qualitative.json`) and a collected parameter sweep
(`sweeps/temperature.json`, `aladin.sweep`); published numbers come from `aladin.paper_numbers`. Figures are plain `matplotlib.figure.Figure` objects
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

from aladin.io import PipelineError, atomic_path, read_json
from aladin.paper_numbers import ANCHORS, EFFICIENCY, EFFICIENCY_SOURCE, paper_point, paper_speedups

CHANCE_HEAD = "chance (random ranking)"
RECALL_KEYS = ("r1", "r5", "r10")
RECALL_COLUMNS = [f"{d} R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
TABLE_COLUMNS = ["head", "protocol", "n_images", "n_folds", *RECALL_COLUMNS, "rsum"]
ANCHOR_COLUMNS = ["system", *RECALL_COLUMNS, "rsum", "status", "source", "note"]
NON_HEAD_KEYS = ("schema_version", "dataset", "split", "features", "ensemble")
SUPPORTED_SCHEMA = 1
# ALADIN.md 7.5: the single VinVL 1K key file, the 5-fold 1K mean, the whole 5K split (the comparable one).
PROTOCOL_ORDER = ("vinvl_1k", "coco_1k_5fold", "coco_5k")
EFFICIENCY_PROTOCOL = "coco_5k"  # the whole test split: the gallery the benchmark times against
MODES_WITHOUT_RSUM = ("crossencoder",)  # timed for its cost only: no cross-encoder is trained here


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


def _protocol_order(protocol: str) -> tuple[int, str]:
    return (PROTOCOL_ORDER.index(protocol) if protocol in PROTOCOL_ORDER else len(PROTOCOL_ORDER), protocol)


def absent_protocols(eval_metrics: dict, source: str = "eval metrics") -> dict[str, str]:
    """Protocols evaluated as absent (e.g. no VinVL 1K key file), with the reason the evaluator recorded."""
    out = {}
    for head in heads_of(eval_metrics, source):
        for protocol, record in eval_metrics[head].items():
            if isinstance(record, dict) and "absent" in record:
                out[protocol] = str(record["absent"])
    return dict(sorted(out.items(), key=lambda kv: _protocol_order(kv[0])))


def build_results_table(eval_metrics: dict, source: str = "eval metrics") -> pd.DataFrame:
    """One row per (head, protocol) plus one chance row per protocol, recalls in percent.

    Rows are grouped by protocol (vinvl_1k, coco_1k_5fold, coco_5k, then any other by name), heads sorted
    within a protocol and the chance row last, so a reader sees how far above random ranking each head is.
    For coco_1k_5fold the numbers are the means over folds, as eval.json stores them. A protocol recorded
    as absent has no rows (`absent_protocols` says why). Chance depends on the gallery sizes only, so it is
    read from the first head's record.
    """
    rows = []
    heads = heads_of(eval_metrics, source)
    absent = absent_protocols(eval_metrics, source)
    protocols = sorted({p for h in heads for p in eval_metrics[h]} - set(absent), key=_protocol_order)
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


def anchor_table(protocol: str) -> pd.DataFrame:
    """The published numbers for `protocol` (aladin.paper_numbers), with source and reliability label."""
    rows = []
    for a in ANCHORS:
        if a.protocol != protocol:
            continue
        row = {"system": a.system}
        for direction, values in (("i2t", a.i2t), ("t2i", a.t2i)):
            for k, v in zip((1, 5, 10), values):
                row[f"{direction} R@{k}"] = v
        rows.append(dict(row, rsum=a.rsum, status=a.status, source=a.source, note=a.note))
    return pd.DataFrame(rows, columns=ANCHOR_COLUMNS)


def comparison_table(table: pd.DataFrame, protocol: str, dataset: str) -> pd.DataFrame:
    """The paper-style table of one protocol: our heads (source "this run") above the published anchors.

    Missing published values stay empty (never 0). On a dataset other than COCO the anchors are shown for
    orientation only, and every row of ours says which dataset it was measured on.
    """
    ours = table[(table["protocol"] == protocol) & (table["head"] != CHANCE_HEAD)]
    rows = [{"system": f"ours: {r['head']}", **{c: r[c] for c in RECALL_COLUMNS}, "rsum": r["rsum"],
             "status": "measured", "source": f"this run ({dataset}, {r['n_images']} images x {r['n_folds']} fold(s))",
             "note": ""} for _, r in ours.iterrows()]
    return pd.concat([pd.DataFrame(rows, columns=ANCHOR_COLUMNS), anchor_table(protocol)], ignore_index=True)


def format_table(table: pd.DataFrame, decimals: int = 1) -> pd.DataFrame:
    """The table as the report shows it: recalls and rsum as strings with `decimals` places."""
    shown = table.copy()
    for column in [*RECALL_COLUMNS, "rsum"]:
        shown[column] = ["–" if v is None or pd.isna(v) else f"{v:.{decimals}f}" for v in table[column]]
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


def _benchmark_modes(benchmark: dict, source: str) -> list[str]:
    latency = _get(benchmark, ["latency"], source)
    modes = sorted((m for m in latency if m not in MODES_WITHOUT_RSUM), key=_head_order)
    for m in ("matching", "alignment", "crossencoder"):
        if m not in latency:
            raise PipelineError(f"{source}: missing key 'latency.{m}'")
    return modes + list(MODES_WITHOUT_RSUM)


def _t2i_rsum(record: dict) -> float:
    return sum(record["t2i"][k] for k in RECALL_KEYS)


def efficiency_table(eval_metrics: dict, benchmark: dict, protocol: str = EFFICIENCY_PROTOCOL,
                     source: str = "benchmark") -> pd.DataFrame:
    """Per retrieval mode: measured per-query latency (ms, t2i, query encoding included; median and p95,
    and the search alone), its rsum and t2i rsum on `protocol`, and its speed-up over the cross-encoder.

    Latencies come from the benchmark stage (one device, one gallery: the test split). The cross-encoder
    row has a cost but no rsum: it is timed, not trained, here.
    """
    rows = []
    cross = _number(benchmark, ["latency", "crossencoder", "median_ms"], source)
    for mode in _benchmark_modes(benchmark, source):
        median = _number(benchmark, ["latency", mode, "median_ms"], source)
        if not median > 0:
            raise PipelineError(f"{source}: 'latency.{mode}.median_ms' must be positive, got {median}")
        row = {"mode": mode, "median ms": median, "p95 ms": _number(benchmark, ["latency", mode, "p95_ms"], source),
               "search ms": (_number(benchmark, ["latency", mode, "search_median_ms"], source)
                             if "search_median_ms" in benchmark["latency"][mode] else float("nan")),
               "rsum": float("nan"), "t2i rsum": float("nan"), "speed-up vs cross-encoder": cross / median}
        if mode not in MODES_WITHOUT_RSUM:
            if mode not in eval_metrics:
                raise PipelineError(f"eval metrics: missing key '{mode}' (the mode is in the {source})")
            record = _get(eval_metrics, [mode, protocol], "eval metrics")
            row["rsum"] = _number(record, ["rsum"], f"eval metrics {mode}.{protocol}")
            row["t2i rsum"] = _t2i_rsum(record)
        rows.append(row)
    return pd.DataFrame(rows).set_index("mode")


def speedup_table(benchmark: dict, source: str = "benchmark") -> pd.DataFrame:
    """The measured speed-up ratios beside the paper's (PAPER_NUMBERS.md 8), with the gallery they hold for."""
    measured = _get(benchmark, ["speedup"], source)
    paper = paper_speedups()
    n = int(_number(benchmark, ["gallery", "n_images"], source))
    names = ("matching_vs_crossencoder", "matching_vs_alignment", "alignment_vs_crossencoder")
    rows = [{"ratio": name.replace("_", " "), "measured": _number(measured, [name], source), "paper": paper[name],
             "measured on": f"{n} images, {_get(benchmark, ['device', 'type'], source)}"} for name in names]
    # The gallery sweep times every mode at larger galleries too (alignment head on tiled test tokens);
    # its largest such size is the closest to the paper's 5K gallery.
    sized = [r for r in benchmark.get("sweep", {}).get("sizes", {}).values() if "alignment_ms" in r]
    if sized:
        row = max(sized, key=lambda r: r["n"])
        where = f"{source} sweep.sizes.{row['n']}"
        m, a, x = (_number(row, [k], where) for k in ("matching_ms", "alignment_ms", "crossencoder_ms"))
        for out, value in zip(rows, (x / m, a / m, x / a)):
            out[f"measured at {row['n']} images"] = value
    return pd.DataFrame(rows).set_index("ratio")


def _times(ratio: float) -> str:
    """A speed-up ratio in words; below 1 it is a slow-down (a tiny gallery can make the heads cross)."""
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


def _at_size(sp: pd.DataFrame) -> str:
    column = next((c for c in sp.columns if c.startswith("measured at ")), None)
    if column is None:
        return ""
    return (f"; {column} (the gallery grown with the test tokens) {sp.loc['matching vs alignment', column]:.1f}x "
            f"and {sp.loc['matching vs crossencoder', column]:.0f}x")


def headline(eval_metrics: dict, benchmark: dict, protocol: str = EFFICIENCY_PROTOCOL) -> str:
    """One paragraph: how much rsum the matching head keeps, at what measured speed-up, beside the paper."""
    eff = efficiency_table(eval_metrics, benchmark, protocol)
    kept = 100.0 * eff.loc["matching", "rsum"] / eff.loc["alignment", "rsum"]
    sp = speedup_table(benchmark)
    matching, alignment = paper_point("matching"), paper_point("alignment")
    paper_kept = 100.0 * matching.t2i_rsum / alignment.t2i_rsum
    n = int(_number(benchmark, ["gallery", "n_images"], "benchmark"))
    return (f"On {protocol}, the distilled matching head keeps {kept:.1f}% of the alignment head's rsum "
            f"({eff.loc['matching', 'rsum']:.1f} vs {eff.loc['alignment', 'rsum']:.1f}). Measured per text query "
            f"over {n} images, query encoding included, it is {_times(sp.loc['matching vs alignment', 'measured'])} "
            f"than the alignment head and {_times(sp.loc['matching vs crossencoder', 'measured'])} "
            f"than a VinVL-style cross-encoder{_at_size(sp)}. The paper's efficiency plot (COCO 5K, constants) has "
            f"{paper_kept:.1f}% of the t2i rsum at {sp.loc['matching vs alignment', 'paper']:.1f}x and "
            f"{sp.loc['matching vs crossencoder', 'paper']:.1f}x.")


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


def plot_efficiency(eval_metrics: dict, benchmark: dict, protocol: str = EFFICIENCY_PROTOCOL) -> Figure:
    """The paper's efficiency-vs-effectiveness plot: t2i rsum (R@1+R@5+R@10) against per-query latency.

    Left, our modes as measured by the benchmark stage (ms per text query, log x; the cross-encoder, timed
    but not trained here, as a vertical line). Right, the points of the paper's plot (its constants in s,
    log x), our counterparts in the same colours. The axes differ in unit and dataset, so the panels are
    side by side rather than overlaid; their shapes and the horizontal gaps (ratios) are what compare.
    """
    eff = efficiency_table(eval_metrics, benchmark, protocol).reset_index()
    ours = eff[eff["mode"].map(lambda m: m not in MODES_WITHOUT_RSUM)]
    colours = dict(zip(["matching", "alignment", "crossencoder"], sns.color_palette(n_colors=3)))
    fig = Figure(figsize=(8.4, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    offsets = [(5, 4), (5, -10), (5, 14), (5, -20)]  # staggered so modes with equal rsum stay legible
    for i, (_, p) in enumerate(ours.iterrows()):
        colour = colours.get(p["mode"], "0.45")
        left.scatter(p["median ms"], p["t2i rsum"], s=60, color=colour, zorder=3)
        left.annotate(p["mode"], (p["median ms"], p["t2i rsum"]), xytext=offsets[i % len(offsets)],
                      textcoords="offset points", fontsize=7)
    cross = eff.loc[eff["mode"] == "crossencoder", "median ms"].iloc[0]
    left.axvline(cross, color=colours["crossencoder"], linestyle="--")
    left.annotate("cross-encoder\n(cost only)", (cross, ours["t2i rsum"].min()), xytext=(-4, 0),
                  textcoords="offset points", ha="right", fontsize=7, color=colours["crossencoder"])
    left.set_xscale("log")
    left.set_xlim(ours["median ms"].min() / 3, cross * 3)
    left.margins(y=0.25)
    left.set(title="this run (measured)", xlabel="median latency per text query (ms, log)",
             ylabel=f"t2i rsum, R@1+R@5+R@10 ({protocol})")
    for p in EFFICIENCY:
        colour = colours.get(p.kind, "0.6")
        right.scatter(p.latency_s, p.t2i_rsum, s=60, color=colour, marker="s", zorder=3)
        right.annotate(p.system, (p.latency_s, p.t2i_rsum), xytext=(5, 4), textcoords="offset points", fontsize=7)
    right.set_xscale("log")
    right.set_xlim(min(p.latency_s for p in EFFICIENCY) / 3, max(p.latency_s for p in EFFICIENCY) * 5)
    right.margins(y=0.15)
    right.set(title="the paper's plot (COCO 5K, constants)", xlabel="system latency (s, log)", ylabel="rsum (t2i, inferred)")
    return fig


# ---------------------------------------------------------------------------------------------------
# The three systems (ALADIN and its neighbours as recipes, aladin.peers)

SYSTEMS_PROTOCOLS = ("coco_1k_5fold", "coco_5k")


def load_peers(folder: str | Path, recipes: Iterable[str]) -> dict[str, tuple[dict, dict]]:
    """{recipe: (metrics, latency)} from the evaluate_peer outputs `<recipe>.json`, `<recipe>.latency.json` of
    the recipes named (params peers.recipes; files of recipes switched off since are ignored)."""
    folder = Path(folder)
    out = {}
    for name in recipes:
        paths = folder / f"{name}.json", folder / f"{name}.latency.json"
        for path in paths:
            if not path.is_file():
                raise PipelineError(f"{path}: file not found (evaluate_peer@{name}'s output)")
        out[name] = tuple(read_json(p) for p in paths)
    return out


# Our rows and the published system each stands for (aladin.paper_numbers). A recipe with published numbers
# adds its line here; SelfAlign publishes only relative gains (PEERS.md 5), so it has none.
PUBLISHED_AS = {"ALADIN matching head": ("ALADIN (paperswithcode row)", "ALADIN A/ft. + D/ft."),
                "ALADIN alignment head": (None, "ALADIN A/ft."),
                "teran": ("TERAN", "TERAN")}
PUBLISHED_SYSTEMS = ("ALADIN A/ft. + D/ft.", "ALADIN A/ft.", "TERAN", "TERN")  # the paper plot's retrieval systems


def _published_rsum(system: str | None, protocol: str) -> float | None:
    anchor = next((a for a in ANCHORS if a.system == system and a.protocol == protocol), None)
    return None if anchor is None else anchor.rsum


def systems_table(eval_metrics: dict, benchmark: dict, peers: dict[str, tuple[dict, dict]]) -> pd.DataFrame:
    """ALADIN's two heads and every neighbour on the same split and protocols: rsum per protocol, the index a
    gallery needs, and the median per-text-query latency on the same device (ALADIN's from the benchmark
    stage, a neighbour's from evaluate_peer: query encoding plus search against the encoded test gallery).
    Beside them the published figures of the same system where there are any (None otherwise): rsum per
    protocol from `ANCHORS` with its reliability label, and the latency constant of the paper's plot."""
    rows = []
    for head, kind in (("matching", "vector (kNN)"), ("alignment", "set (brute force)")):
        row = {"system": f"ALADIN {head} head", "index": kind}
        for protocol in SYSTEMS_PROTOCOLS:
            row[f"rsum {protocol}"] = _number(eval_metrics, [head, protocol, "rsum"], "eval metrics")
        row["t2i rsum coco_5k"] = _t2i_rsum(eval_metrics[head]["coco_5k"])
        row["median ms per query"] = _number(benchmark, ["latency", head, "median_ms"], "benchmark")
        rows.append(row)
    for name, (metrics, latency) in sorted(peers.items()):
        source = f"metrics/peers/{name}.json"
        record = _get(metrics, [name], source)
        t2i = _get(latency, [name, "t2i"], f"metrics/peers/{name}.latency.json")
        row = {"system": name, "index": "vector (kNN)" if t2i.get("index_kind") == "vector" else "set (brute force)"}
        for protocol in SYSTEMS_PROTOCOLS:
            row[f"rsum {protocol}"] = _number(record, [protocol, "rsum"], source)
        row["t2i rsum coco_5k"] = _t2i_rsum(record["coco_5k"])
        row["median ms per query"] = _number(t2i, ["median_ms"], f"metrics/peers/{name}.latency.json")
        rows.append(row)
    for row in rows:
        anchor, point = PUBLISHED_AS.get(row["system"], (None, None))
        for protocol in SYSTEMS_PROTOCOLS:
            row[f"published rsum {protocol}"] = _published_rsum(anchor, protocol)
        row["published status"] = next((a.status for a in ANCHORS if a.system == anchor), None)
        row["paper plot latency (s)"] = next((p.latency_s for p in EFFICIENCY if p.system == point), None)
    return pd.DataFrame(rows).set_index("system")


def published_systems_table() -> pd.DataFrame:
    """The published numbers of the three systems' families on COCO (PEERS.md 5, PAPER_NUMBERS.md 2):
    rsum per protocol with status and source, and the latency and t2i rsum the ALADIN paper's plot gives."""
    names = ["ALADIN (paperswithcode row)", *dict.fromkeys(a.system for a in ANCHORS
                                                           if a.system in PUBLISHED_SYSTEMS)]
    rows = []
    for name in names:
        anchors = [a for a in ANCHORS if a.system == name and a.protocol in SYSTEMS_PROTOCOLS]
        row = {"system": name}
        for protocol in SYSTEMS_PROTOCOLS:
            row[f"rsum {protocol}"] = _published_rsum(name, protocol)
        row["status"] = anchors[0].status if anchors else None
        row["source"] = anchors[0].source if anchors else None
        rows.append(row)
    for p in EFFICIENCY:
        if p.system in PUBLISHED_SYSTEMS:
            rows.append({"system": f"{p.system} (paper plot)", "t2i rsum, paper plot": p.t2i_rsum,
                         "latency (s), paper plot": p.latency_s, "status": "verified constant, meaning inferred",
                         "source": EFFICIENCY_SOURCE})
    return pd.DataFrame(rows).set_index("system")


def plot_systems(table: pd.DataFrame) -> Figure:
    """Left: t2i rsum (coco_5k) of every system of this run against its measured per-query latency (log x).
    Right: the same axes as the ALADIN paper's plot gives them for ALADIN, TERAN and TERN (its constants, s);
    SelfAlign has no published point. Side by side, not overlaid: units and datasets differ."""
    fig = Figure(figsize=(8.4, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    colours = dict(zip(table.index, sns.color_palette(n_colors=len(table))))
    for name, row in table.iterrows():
        left.scatter(row["median ms per query"], row["t2i rsum coco_5k"], s=60, color=colours[name], zorder=3,
                     marker="o" if row["index"].startswith("vector") else "s")
        left.annotate(name, (row["median ms per query"], row["t2i rsum coco_5k"]), xytext=(5, 4),
                      textcoords="offset points", fontsize=7)
    left.set_xscale("log")
    low, high = table["median ms per query"].min(), table["median ms per query"].max()
    left.set_xlim(low / 3, high * 4)
    left.margins(y=0.2)
    left.set(xlabel="median latency per text query (ms, log)", ylabel="t2i rsum, R@1+R@5+R@10 (coco_5k)",
             title="this run; circles: kNN index, squares: brute force")
    ours_of = {point: name for name, (_, point) in PUBLISHED_AS.items()}
    points = [p for p in EFFICIENCY if p.system in PUBLISHED_SYSTEMS]
    for p in points:
        ours = ours_of.get(p.system)
        colour = colours[ours] if ours in colours else "0.6"
        right.scatter(p.latency_s, p.t2i_rsum, s=60, color=colour, zorder=3,
                      marker="o" if p.kind == "matching" or p.system == "TERN" else "s")
        right.annotate(p.system, (p.latency_s, p.t2i_rsum), xytext=(5, 4), textcoords="offset points", fontsize=7)
    right.set_xscale("log")
    right.set_xlim(min(p.latency_s for p in points) / 3, max(p.latency_s for p in points) * 4)
    right.margins(y=0.2)
    right.set(xlabel="system latency (s, log), paper constants", ylabel="rsum (t2i, inferred)",
              title="published (ALADIN's plot, COCO 5K); SelfAlign: none")
    return fig


# ---------------------------------------------------------------------------------------------------
# Parameter sweep (aladin.sweep)

SWEEP_LINES = (("matching", "coco_5k"), ("matching", "coco_1k_5fold"), ("alignment", "coco_5k"))


def sweep_table(sweep: dict, source: str = "sweep") -> pd.DataFrame:
    """One row per sweep point: the swept value, experiment name and kind, then rsum per head/protocol."""
    version = _get(sweep, ["schema_version"], source)
    if version != 1:
        raise PipelineError(f"{source}: schema_version {version!r} is not supported (expected 1)")
    param = _get(sweep, ["param"], source)
    points = _get(sweep, ["points"], source)
    if not isinstance(points, list):
        raise PipelineError(f"{source}: 'points' must be a list")
    rows = []
    for i, point in enumerate(points):
        where = f"{source}: points[{i}]"
        row = {param: _number(point, ["value"], where), "experiment": _get(point, ["name"], where),
               "kind": _get(point, ["kind"], where)}
        for head, protocols in sorted(_get(point, ["rsum"], where).items(), key=lambda kv: _head_order(kv[0])):
            for protocol in sorted(protocols, key=_protocol_order):
                row[f"{head} {protocol}"] = _number(protocols, [protocol], f"{where}.rsum.{head}")
        rows.append(row)
    return pd.DataFrame(rows)


def plot_sweep(sweep: dict, source: str = "sweep") -> Figure | None:
    """rsum against the swept param (the matching head on both protocols, the alignment head for reference),
    or None when the sweep has fewer than two distinct values (nothing to draw yet)."""
    table = sweep_table(sweep, source)
    param = sweep["param"]
    if table.empty or table[param].nunique() < 2:
        return None
    fig = Figure(figsize=(5.0, 3.3), layout="constrained")
    ax = fig.subplots()
    for (head, protocol), colour in zip(SWEEP_LINES, sns.color_palette(n_colors=len(SWEEP_LINES))):
        column = f"{head} {protocol}"
        if column not in table:
            continue
        line = table.groupby(param, sort=True)[column].mean()  # repeated values (seeds) average
        ax.plot(line.index, line.values, marker="o", color=colour, linestyle="--" if head == "alignment" else "-",
                label=f"{head}, {protocol}")
    baseline = table[table["kind"] == "baseline"]
    if not baseline.empty and "matching coco_5k" in table:
        ax.scatter(baseline[param], baseline["matching coco_5k"], s=120, facecolors="none", edgecolors="k",
                   zorder=4, label="committed baseline")
    ax.set(xlabel=param, ylabel="rsum")
    ax.legend(fontsize=7)
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

