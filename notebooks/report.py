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
# evaluation, latency, training and qualitative outputs of the pipeline; every number and figure comes
# from `aladin/report.py`.

# %% tags=["parameters"]
# Defaults point at the test fixtures, so the notebook also runs bare in an editor (STYLE.md 8.3).
eval_metrics = "tests/fixtures/report/eval.json"
latency = "tests/fixtures/report/latency.json"
live_dirs = "tests/fixtures/report/dvclive/train_alignment,tests/fixtures/report/dvclive/train_distill"
qualitative = "tests/fixtures/report/qualitative.json"
dataset_dir = "tests/fixtures/report/dataset"
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
timing = read_json(latency)
display(Markdown(f"Dataset **{evaluation['dataset']}**, split **{evaluation['split']}**."))

# %% [markdown]
# ## Headline
#
# The matching head's share of the alignment head's rsum (sum of the six recalls, in percent points) on
# the whole test split (`coco_5k`), against how much faster it answers a text query, next to the same
# ratios read from the paper's efficiency plot.

# %%
display(Markdown(report.headline(evaluation, timing)))

# %% [markdown]
# ## Retrieval results
#
# Recall@K in percent for image-to-text (i2t) and text-to-image (t2i) retrieval; rsum is their sum.
# `coco_1k_5fold` is the mean over folds of `eval.fold_size` test images (the scaled-down analogue of
# COCO 1K, five folds); `coco_5k` ranks against the whole test split (the analogue of COCO 5K). The
# *chance* rows are the expected recalls of a random ranking over the same gallery, the floor each head
# should clear by far. Also written to `tables/results.csv` and `tables/results.md`.

# %%
table = report.build_results_table(evaluation, source=eval_metrics)
report.write_tables(table, out / "tables")
display(report.format_table(table).set_index(["protocol", "head"]))

# %% [markdown]
# ## Efficiency
#
# rsum on `coco_5k` against the median latency of one text-to-image query (query encoding included when
# `includes_query_encoding` is true), log scale; `t2i search ms` is the search alone against the
# pre-encoded gallery. The paper draws the same plot for COCO 5K.

# %%
display(report.latency_table(evaluation, timing))
fig = report.plot_latency_vs_rsum(evaluation, timing)
display(Image(filename=report.save_figure(fig, out / "figures" / "latency_vs_rsum.png")))

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
