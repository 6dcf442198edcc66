# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # ALADIN: results report
#
# Retrieval quality and cost of the two heads of ALADIN (Messina et al., CBMI 2022): the **alignment
# head**, which scores every (image, caption) pair through word-region alignments of the VinVL/BERT
# backbone, and the **matching head**, which distils those scores into a shared embedding space so that
# retrieval is one dot product per pair. Built by the `report` stage (`python -m stages.report`) from the
# evaluation, benchmark, training and qualitative outputs of the pipeline and a collected temperature
# sweep; every number and figure comes from `aladin/report.py`.

# %% tags=["parameters"]
# Defaults point at the test fixtures, so the notebook also runs bare in an editor (STYLE.md 8.3).
eval_metrics = "tests/fixtures/report/eval.json"
benchmark = "tests/fixtures/report/benchmark.json"
live_dirs = "tests/fixtures/report/dvclive/train_alignment,tests/fixtures/report/dvclive/train_distill"
qualitative = "tests/fixtures/report/qualitative.json"
dataset_dir = "tests/fixtures/report/dataset"
sweep = "tests/fixtures/report/sweep.json"
peers_dir = "tests/fixtures/report/peers"
recipes = "teran,selfalign"
out_dir = "build/report"
top_k = 3

# %%
from pathlib import Path

from IPython.display import Image, Markdown, display

from aladin import report
from aladin.io import read_json

report.set_theme()
out = Path(out_dir)
evaluation = read_json(eval_metrics)
bench = read_json(benchmark)
display(Markdown(f"Dataset **{evaluation['dataset']}**, split **{evaluation['split']}**."))

# %% [markdown]
# ## Headline
#
# The matching head's share of the alignment head's rsum (sum of the six recalls, in percent points) on
# the whole test split (`coco_5k`), and how much faster it answers a text query than the alignment head
# and than a VinVL-style cross-encoder, all measured on one device and one gallery by the benchmark stage;
# next to the same ratios read from the paper's efficiency plot.

# %%
display(Markdown(report.headline(evaluation, bench)))

# %% [markdown]
# ## Retrieval results
#
# Recall@K in percent for image-to-text (i2t) and text-to-image (t2i) retrieval; rsum is their sum.
# Three protocols (ALADIN.md 7.5): `vinvl_1k` is the one image set of a key file (VinVL's
# `test_img_keys_1k.tsv`; its seeded analogue on synthetic data), `coco_1k_5fold` the mean over folds of
# `eval.fold_size` images (COCO: five folds of 1,000), `coco_5k` the whole test split (COCO 5K, the
# protocol comparable across papers). The *chance* rows are the expected recalls of a random ranking over
# the same gallery. Also written to `tables/results.csv` and `tables/results.md`.

# %%
table = report.build_results_table(evaluation, source=eval_metrics)
report.write_tables(table, out / "tables")
display(report.format_table(table).set_index(["protocol", "head"]))
for protocol, reason in report.absent_protocols(evaluation, source=eval_metrics).items():
    display(Markdown(f"`{protocol}`: not evaluated ({reason})."))

# %% [markdown]
# ## Against the published numbers
#
# Per protocol, our heads above the numbers published for ALADIN, its predecessor TERAN and the
# cross-encoders it distils from (PAPER_NUMBERS.md, via `aladin/paper_numbers.py`), each with its source
# and reliability: *verified* (the authors' own repository), *unverified* (an aggregator or a third party),
# a dash where no value is published. The ALADIN paper's own tables were not available; its efficiency
# plot's constants are below. Published numbers are MS-COCO; on the synthetic default they only show the
# layout, not a comparison.

# %%
for protocol in dict.fromkeys(table["protocol"]):
    display(Markdown(f"### `{protocol}`"))
    display(report.format_table(report.comparison_table(table, protocol, evaluation["dataset"])).set_index("system"))

# %% [markdown]
# ## Efficiency versus effectiveness
#
# Measured by the benchmark stage (`metrics/benchmark.json`): median and p95 latency of one text query
# against the test gallery, query encoding included (`search ms`: the search alone), for each retrieval
# mode, next to its rsum; the cross-encoder (one joint forward per caption-image pair, timed on a sample
# of pairs and extrapolated to the gallery) has a cost but no rsum, since none is trained here. Then the
# speed-up ratios beside the paper's (89.6x and 4.3x come from latency constants typed into its plotting
# script, `mesnico/ALADIN alad/plots/plot_efficiency_vs_effectiveness.py`), and the paper's plot redrawn
# from measured latencies, its own points on the right.

# %%
display(report.efficiency_table(evaluation, bench))
display(report.speedup_table(bench))
fig = report.plot_efficiency(evaluation, bench)
display(Image(filename=report.save_figure(fig, out / "figures" / "efficiency_vs_effectiveness.png")))

# %% [markdown]
# ## Three systems on one split
#
# ALADIN beside its two neighbours, trained as recipes of this pipeline on the same pairs and evaluated by
# the same evaluator on the same test split (`aladin/recipes/`, PEERS.md): **TERAN** (its predecessor:
# the same word-region alignment score, separate region and word transformers, no distilled embedding,
# so its gallery is searched by brute force) and **SelfAlign** (concept- and context-level
# self-supervised alignment on a CAMERA dual encoder, searched as a vector index). rsum per protocol and
# the median latency of one text query on the same device, then the published figures of the same system
# (PEERS.md 5-6) with their reliability label: rsum on COCO, and the latency constant of the ALADIN paper's
# plot. SelfAlign publishes no absolute recalls, only gains of "9.1%, 4.2% and 6.6%" [R@sum] on Flickr30k,
# COCO 1K and COCO 5K over non-pre-trained dual encoders (whether points or percent, and over which base,
# is not stated; PAPER_NUMBERS.md 3).
# The plot puts this run (left, measured) beside the published points (right, the paper's constants):
# side by side, not overlaid, because units, scale and data differ.

# %%
systems = report.systems_table(evaluation, bench, report.load_peers(peers_dir, [r for r in recipes.split(",") if r]))
display(systems)
display(report.published_systems_table())
fig = report.plot_systems(systems)
display(Image(filename=report.save_figure(fig, out / "figures" / "systems.png")))

# %% [markdown]
# ## Temperature sweep
#
# rsum against `distill.temperature` over the DVC experiments collected into `sweeps/temperature.json`
# (`python -m aladin.sweep`, which reads `dvc exp show --json`): the committed baseline and its experiments
# that change nothing but the temperature. The alignment head (dashed) is trained before distillation, so
# it stays flat. To extend it: `make sweep TEMPERATURES=1.0,2.0,4.0,8.0` (README).

# %%
sweep_doc = read_json(sweep)
fig = report.plot_sweep(sweep_doc, source=sweep)
if fig is None:
    display(Markdown("No sweep collected yet (fewer than two temperatures): run `make sweep` (README)."))
else:
    display(report.sweep_table(sweep_doc, source=sweep).set_index(sweep_doc["param"]))
    display(Image(filename=report.save_figure(fig, out / "figures" / "temperature_sweep.png")))
for item in sweep_doc.get("excluded", []):
    display(Markdown(f"Excluded experiment `{item['name']}`: {item['reason']}."))

# %% [markdown]
# ## Training
#
# Per training stage (columns), the training loss per epoch (top) and the validation rsum of each head
# (bottom). `val/selection_rsum` is the value that selects the kept checkpoint.

# %%
history = report.load_histories(live_dirs.split(","))
fig = report.plot_training_curves(history)
display(Image(filename=report.save_figure(fig, out / "figures" / "training_curves.png")))

# %% [markdown]
# ## Qualitative examples
#
# For a few test captions, the top-ranked images of each head. The ground-truth image has a green frame;
# a row title notes when it is not among the shown images. Matching head first, then alignment head.

# %%
for head in ("matching", "alignment"):
    fig = report.plot_qualitative(read_json(qualitative), dataset_dir, head=head, top_k=top_k, source=qualitative)
    display(Image(filename=report.save_figure(fig, out / "figures" / f"qualitative_{head}.png")))
