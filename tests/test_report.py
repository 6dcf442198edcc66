"""The report: tables against the fixture JSON, DVCLive parsing, deterministic figures, the papermill stage.

Fixtures live in tests/fixtures/report (see its README): hand-written metric files in the formats the
evaluate, benchmark and training stages write, and four 24x24 PNGs standing in for the dataset.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from aladin import report
from aladin.io import PipelineError
from stages import report as report_stage

FIXTURES = Path(__file__).parent / "fixtures" / "report"
LIVE_DIRS = [FIXTURES / "dvclive" / "train_alignment", FIXTURES / "dvclive" / "train_distill"]


def load(name):
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture
def evaluation():
    return load("eval.json")


@pytest.fixture
def bench():
    return load("benchmark.json")


@pytest.fixture
def sweep_doc():
    return load("sweep.json")


# ---------------------------------------------------------------------------------------------------
# Tables


def test_results_table_equals_fixture_values(evaluation):
    table = report.build_results_table(evaluation)
    assert list(table.columns) == report.TABLE_COLUMNS
    assert list(zip(table["head"], table["protocol"])) == [
        ("alignment", "coco_1k_5fold"), ("matching", "coco_1k_5fold"), (report.CHANCE_HEAD, "coco_1k_5fold"),
        ("alignment", "coco_5k"), ("matching", "coco_5k"), (report.CHANCE_HEAD, "coco_5k")]
    row = table.set_index(["head", "protocol"])
    # Hand-checked cells of eval.json.
    assert row.loc[("matching", "coco_5k"), "t2i R@5"] == 52.2
    assert row.loc[("alignment", "coco_1k_5fold"), "i2t R@1"] == 62.6
    assert row.loc[("alignment", "coco_1k_5fold"), "rsum"] == 466.6  # 62.6+89.0+95.2+47.4+81.6+90.8
    assert row.loc[("matching", "coco_1k_5fold"), "n_folds"] == 5
    assert row.loc[("matching", "coco_5k"), "n_images"] == 500
    # Chance of a random ranking: t2i R@K = K / n_images; i2t R@1 = 5 captions / 5 n_images.
    assert row.loc[(report.CHANCE_HEAD, "coco_5k"), "t2i R@10"] == 2.0
    assert row.loc[(report.CHANCE_HEAD, "coco_1k_5fold"), "i2t R@1"] == 1.0
    assert row.loc[(report.CHANCE_HEAD, "coco_1k_5fold"), "rsum"] == 31.57
    # Every cell against the JSON it came from.
    for (head, protocol), r in row.iterrows():
        rec = evaluation["alignment" if head == report.CHANCE_HEAD else head][protocol]
        rec = rec["chance"] if head == report.CHANCE_HEAD else rec
        for d in ("i2t", "t2i"):
            for k in (1, 5, 10):
                assert r[f"{d} R@{k}"] == rec[d][f"r{k}"]
        assert r["rsum"] == rec["rsum"]
        assert r["rsum"] == pytest.approx(sum(r[c] for c in report.RECALL_COLUMNS), abs=0.011)


def test_results_table_names_missing_key_and_bad_schema(evaluation):
    broken = copy.deepcopy(evaluation)
    del broken["matching"]["coco_5k"]["t2i"]["r5"]
    with pytest.raises(PipelineError, match=r"eval.json: missing key 'matching.coco_5k.t2i.r5'"):
        report.build_results_table(broken, source="eval.json")
    broken = copy.deepcopy(evaluation)
    broken["alignment"]["coco_5k"]["chance"]["rsum"] = "high"
    with pytest.raises(PipelineError, match=r"'alignment.coco_5k.chance.rsum' must be a number"):
        report.build_results_table(broken)
    broken = dict(evaluation, schema_version=2)
    with pytest.raises(PipelineError, match="schema_version 2"):
        report.build_results_table(broken)


def test_format_and_write_tables(evaluation, tmp_path):
    table = report.build_results_table(evaluation)
    shown = report.format_table(table)
    assert shown.loc[4, "rsum"] == "309.0" and shown.loc[0, "i2t R@5"] == "89.0" and shown.loc[2, "i2t R@5"] == "4.9"
    written = report.write_tables(table, tmp_path / "tables")
    assert [p.name for p in written] == ["results.csv", "results.md"]
    pd.testing.assert_frame_equal(pd.read_csv(written[0]), table, check_dtype=False)
    markdown = written[1].read_text()
    assert "| matching                | coco_5k       |" in markdown and "309.0 |" in markdown


def test_efficiency_table_speedups_and_headline(evaluation, bench):
    eff = report.efficiency_table(evaluation, bench)
    assert list(eff.index) == ["alignment", "matching", "crossencoder"]
    assert eff.loc["matching", "median ms"] == 2.0 and eff.loc["alignment", "search ms"] == 6.0
    # the fixture's latencies are 2, 8 and 180 ms: 180 / 2 = 90, 180 / 8 = 22.5
    assert eff["speed-up vs cross-encoder"].tolist() == [22.5, 90.0, 1.0]
    assert eff.loc["matching", "rsum"] == 309.0 and pd.isna(eff.loc["crossencoder", "rsum"])
    t2i = evaluation["matching"]["coco_5k"]["t2i"]
    assert eff.loc["matching", "t2i rsum"] == pytest.approx(t2i["r1"] + t2i["r5"] + t2i["r10"])
    sp = report.speedup_table(bench)
    assert sp["measured"].tolist() == [90.0, 4.0, 22.5]
    # PAPER_NUMBERS.md 8: 2.06 / 0.023 = 89.6, 0.098 / 0.023 = 4.26, 2.06 / 0.098 = 21.0
    assert [round(v, 1) for v in sp["paper"]] == [89.6, 4.3, 21.0]
    assert sp["measured at 5000 images"].tolist() == [720.0, 20.0, 36.0]  # the fixture's sweep row
    text = report.headline(evaluation, bench)
    # 309.0 / 328.2 = 94.15%; paper 215 / 224 = 95.98%
    assert "keeps 94.1% of the alignment head's rsum (309.0 vs 328.2)" in text
    assert "over 500 images, query encoding included, it is 4.0x faster than the alignment head and 90.0x" in text
    assert "96.0% of the t2i rsum at 4.3x and 89.6x" in text
    assert "; measured at 5000 images (the gallery grown with the test tokens) 20.0x and 720x." in text
    slow = copy.deepcopy(bench)
    slow["speedup"]["matching_vs_alignment"] = 0.5
    assert "it is 2.0x slower than the alignment head" in report.headline(evaluation, slow)
    broken = copy.deepcopy(bench)
    del broken["latency"]["crossencoder"]
    with pytest.raises(PipelineError, match="benchmark.json: missing key 'latency.crossencoder'"):
        report.efficiency_table(evaluation, broken, source="benchmark.json")
    extra = copy.deepcopy(bench)
    extra["latency"]["rerank@10"] = dict(bench["latency"]["matching"])
    with pytest.raises(PipelineError, match="eval metrics: missing key 'rerank@10'"):
        report.efficiency_table(evaluation, extra)


def test_protocols_in_paper_order_and_absent_ones_named(evaluation):
    metrics = copy.deepcopy(evaluation)
    for head in ("alignment", "matching"):
        metrics[head]["vinvl_1k"] = dict(copy.deepcopy(metrics[head]["coco_1k_5fold"]), protocol="vinvl_1k", n_folds=1)
    table = report.build_results_table(metrics)
    assert list(dict.fromkeys(table["protocol"])) == ["vinvl_1k", "coco_1k_5fold", "coco_5k"]
    for head in ("alignment", "matching"):
        metrics[head]["vinvl_1k"] = {"protocol": "vinvl_1k", "absent": "no key file"}
    assert report.absent_protocols(metrics) == {"vinvl_1k": "no key file"}
    assert "vinvl_1k" not in set(report.build_results_table(metrics)["protocol"])


def test_comparison_tables_put_published_numbers_beside_ours(evaluation):
    table = report.build_results_table(evaluation)
    five_k = report.comparison_table(table, "coco_5k", "coco")
    assert list(five_k.columns) == report.ANCHOR_COLUMNS
    assert five_k["system"].tolist()[:2] == ["ours: alignment", "ours: matching"]
    assert five_k.loc[1, "rsum"] == 309.0 and five_k.loc[1, "status"] == "measured"
    teran = five_k[five_k["system"] == "TERAN"].iloc[0]
    # PAPER_NUMBERS.md 2: 55.6/83.9/91.6 | 42.6/72.5/82.9, rsum 429.1 (derived)
    assert [teran[c] for c in report.RECALL_COLUMNS] == [55.6, 83.9, 91.6, 42.6, 72.5, 82.9]
    assert teran["rsum"] == 429.1 and teran["status"] == "unverified (third party)"
    vinvl = five_k[five_k["system"] == "VinVL-base"].iloc[0]
    assert pd.isna(vinvl["i2t R@10"]) and pd.isna(vinvl["rsum"]) and vinvl["status"] == "verified"
    shown = report.format_table(five_k)
    assert shown.loc[five_k["system"] == "VinVL-base", "i2t R@10"].item() == "–"  # never 0
    assert set(report.comparison_table(table, "coco_1k_5fold", "coco")["system"]) >= {"TERAN", "TERN"}
    assert report.anchor_table("vinvl_1k")["system"].tolist() == ["VinVL-base"]
    for protocol in ("vinvl_1k", "coco_1k_5fold", "coco_5k"):
        anchors = report.anchor_table(protocol)
        assert not anchors.empty and anchors["source"].str.len().min() > 5
        assert set(anchors["status"]) <= {"verified", "unverified (aggregator)", "unverified (third party)"}


def test_systems_table_puts_the_neighbours_beside_aladin(evaluation, bench):
    peers = report.load_peers(FIXTURES / "peers", ["teran", "selfalign"])
    assert sorted(peers) == ["selfalign", "teran"]
    table = report.systems_table(evaluation, bench, peers)
    assert list(table.index) == ["ALADIN matching head", "ALADIN alignment head", "selfalign", "teran"]
    assert table.loc["teran", "rsum coco_5k"] == 290.0 and table.loc["selfalign", "rsum coco_1k_5fold"] == 410.0
    assert table.loc["teran", "index"] == "set (brute force)" and table.loc["selfalign", "index"].startswith("vector")
    assert table.loc["ALADIN matching head", "median ms per query"] == 2.0  # from the benchmark fixture
    assert table.loc["teran", "median ms per query"] == 12.0 and table.loc["teran", "t2i rsum coco_5k"] == 135.0
    # published beside ours: TERAN's six recalls (55.6+83.9+91.6+42.6+72.5+82.9), the aggregator's ALADIN row
    assert table.loc["teran", "published rsum coco_5k"] == 429.1 and table.loc["teran", "published rsum coco_1k_5fold"] == 524.8
    assert table.loc["ALADIN matching head", "published rsum coco_5k"] == 466.0
    assert table.loc["teran", "paper plot latency (s)"] == pytest.approx(0.375)
    assert pd.isna(table.loc["selfalign", "published rsum coco_5k"]) and pd.isna(table.loc["selfalign", "published status"])
    left, right = report.plot_systems(table).axes
    # left: t2i R@1+R@5+R@10 on coco_5k (matching 22.6+52.2+66.8, alignment 25.0+55.6+69.2) against measured ms
    points = np.array(sorted(c.get_offsets().tolist()[0] for c in left.collections))
    assert points == pytest.approx(np.array(sorted([[2.0, 141.6], [8.0, 149.8], [12.0, 135.0], [1.5, 110.0]])))
    points = np.array(sorted(c.get_offsets().tolist()[0] for c in right.collections))
    assert points == pytest.approx(np.array(sorted(
        [[0.023 * 5, 215.0], [0.098 * 5, 224.0], [0.075 * 5, 204.1], [0.019 * 5, 169.2]])))
    published = report.published_systems_table()
    assert published.loc["TERN", "rsum coco_1k_5fold"] == 481.5 and published.loc["TERAN", "rsum coco_5k"] == 429.1
    assert published["status"].notna().all()
    assert list(report.load_peers(FIXTURES / "peers", ["teran"])) == ["teran"]  # switched-off recipes ignored
    with pytest.raises(PipelineError, match=r"missing/teran.json: file not found \(evaluate_peer@teran's output\)"):
        report.load_peers(FIXTURES / "missing", ["teran"])


def test_sweep_table_and_plot(sweep_doc):
    table = report.sweep_table(sweep_doc)
    assert table["distill.temperature"].tolist() == [2.0, 6.0, 8.0]
    assert table["matching coco_5k"].tolist() == [300.0, 310.0, 305.0]
    assert list(table.columns[:3]) == ["distill.temperature", "experiment", "kind"]
    ax = report.plot_sweep(sweep_doc).axes[0]
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines["matching, coco_5k"] == ([2.0, 6.0, 8.0], [300.0, 310.0, 305.0])
    assert lines["alignment, coco_5k"][1] == [320.0, 320.0, 320.0]
    one = dict(sweep_doc, points=sweep_doc["points"][1:2])
    assert report.plot_sweep(one) is None  # a single temperature is no sweep yet
    with pytest.raises(PipelineError, match=r"sweep.json: points\[0\]: missing key 'value'"):
        bad = copy.deepcopy(sweep_doc)
        del bad["points"][0]["value"]
        report.sweep_table(bad, source="sweep.json")


# ---------------------------------------------------------------------------------------------------
# DVCLive history


def test_history_loader_on_fixture_tsvs():
    history = report.load_dvclive_history(LIVE_DIRS[0])
    assert list(history.columns) == ["stage", "metric", "step", "value"]
    assert set(history["stage"]) == {"train_alignment"}
    assert sorted(history["metric"].unique()) == [
        "train/loss", "train/lr", "val/alignment/rsum", "val/matching/rsum", "val/selection_rsum"]
    loss = history[history["metric"] == "train/loss"]
    assert loss["step"].tolist() == [0, 1, 2, 3]
    assert loss["value"].tolist() == [6.41, 4.87, 3.92, 3.35]
    selection = history[history["metric"] == "val/selection_rsum"]["value"].tolist()
    matching = history[history["metric"] == "val/matching/rsum"]["value"].tolist()
    alignment = history[history["metric"] == "val/alignment/rsum"]["value"].tolist()
    assert selection == pytest.approx([a + m for a, m in zip(alignment, matching)])  # compat.val_rsum_sum_heads
    both = report.load_histories(LIVE_DIRS)
    assert list(dict.fromkeys(both["stage"])) == ["train_alignment", "train_distill"]
    assert both[(both["stage"] == "train_distill") & (both["metric"] == "val/matching/rsum")]["value"].tolist() == \
        [180.6, 288.4, 329.2, 336.8]


def test_history_loader_timestamp_resume_and_errors(tmp_path):
    metrics = tmp_path / "live" / "plots" / "metrics" / "train"
    metrics.mkdir(parents=True)
    # timestamp column (Live(..., timestamp=True)), a resumed run re-logging step 1, and a NaN.
    (metrics / "loss.tsv").write_text("timestamp\tstep\tloss\n10\t0\t2.5\n11\t1\t9.0\n12\t1\t2.0\n13\t2\tnan\n")
    history = report.load_dvclive_history(tmp_path / "live")
    assert history["step"].tolist() == [0, 1, 2]
    assert history["value"].tolist()[:2] == [2.5, 2.0] and pd.isna(history["value"].iloc[2])
    (metrics / "loss.tsv").write_text("step\tvalue\n0\t1.0\n")
    with pytest.raises(PipelineError, match=r"loss.tsv:1: header must have columns 'step' and 'loss'"):
        report.load_dvclive_history(tmp_path / "live")
    (metrics / "loss.tsv").write_text("step\tloss\n0\t1.0\nzero\t2.0\n")
    with pytest.raises(PipelineError, match=r"loss.tsv:3: step must be an integer"):
        report.load_dvclive_history(tmp_path / "live")
    with pytest.raises(PipelineError, match="DVCLive metrics folder not found"):
        report.load_dvclive_history(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------
# Figures


def figures(evaluation, bench):
    qualitative = load("qualitative.json")
    return {
        "training": lambda: report.plot_training_curves(report.load_histories(LIVE_DIRS)),
        "efficiency": lambda: report.plot_efficiency(evaluation, bench),
        "sweep": lambda: report.plot_sweep(load("sweep.json")),
        "qualitative": lambda: report.plot_qualitative(qualitative, FIXTURES / "dataset", head="alignment"),
    }


def test_figures_are_byte_identical_pngs(evaluation, bench, tmp_path):
    report.set_theme()
    for name, make in figures(evaluation, bench).items():
        fig = make()
        first = report.save_figure(fig, tmp_path / f"{name}-1.png").read_bytes()
        again = report.save_figure(fig, tmp_path / f"{name}-2.png").read_bytes()
        rebuilt = report.save_figure(make(), tmp_path / f"{name}-3.png").read_bytes()
        assert first[:8] == b"\x89PNG\r\n\x1a\n" and len(first) > 1000
        assert first == again == rebuilt, name
        assert b"Software" not in first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}-{i}.png" for n in ("training", "efficiency", "sweep", "qualitative") for i in (1, 2, 3))


def test_training_curves_layout():
    fig = report.plot_training_curves(report.load_histories(LIVE_DIRS))
    assert len(fig.axes) == 4  # (loss, rsum) x (train_alignment, train_distill)
    assert [ax.get_title() for ax in fig.axes[:2]] == ["train_alignment", "train_distill"]
    distill_rsum = fig.axes[3]
    assert len(distill_rsum.get_lines()) >= 3  # alignment, matching, selection rsum
    ys = sorted(tuple(line.get_ydata()) for line in distill_rsum.get_lines() if len(line.get_ydata()) == 4)
    assert (180.6, 288.4, 329.2, 336.8) in ys


def test_efficiency_plot_points(evaluation, bench):
    ours, paper = report.plot_efficiency(evaluation, bench).axes
    assert ours.get_xscale() == paper.get_xscale() == "log"
    points = sorted(tuple(c.get_offsets().tolist()[0]) for c in ours.collections)
    t2i = {h: sum(evaluation[h]["coco_5k"]["t2i"][k] for k in ("r1", "r5", "r10")) for h in ("alignment", "matching")}
    assert points == sorted([(8.0, pytest.approx(t2i["alignment"])), (2.0, pytest.approx(t2i["matching"]))])
    assert [line.get_xdata()[0] for line in ours.get_lines()] == [180.0]  # the cross-encoder's cost
    published = sorted(tuple(c.get_offsets().tolist()[0]) for c in paper.collections)
    assert (pytest.approx(0.115), 215.0) in published and (pytest.approx(10.3), 231.4) in published
    assert len(published) == 6


def test_qualitative_grid_frames_ground_truth():
    qualitative = load("qualitative.json")
    fig = report.plot_qualitative(qualitative, FIXTURES / "dataset", head="matching")
    assert len(fig.axes) == 3 * 3  # 3 queries x top-3
    green, grey = to_rgba("#2ca02c"), to_rgba("0.6")
    truth_ranks = [[17, 3, 40].index(17), [40, 9, 3].index(9), None]  # from qualitative.json, matching lists
    for row, rank in enumerate(truth_ranks):
        for col in range(3):
            colour = fig.axes[3 * row + col].spines["left"].get_edgecolor()
            assert colour == (green if col == rank else grey)
    titles = [sub.get_suptitle() for sub in fig.subfigs]  # one row (subfigure) per query
    assert titles[0].startswith('"a small red circle')
    assert "ground truth 40 not in top 3" in titles[2]
    assert fig.axes[0].images[0].get_array().shape == (24, 24, 3)
    assert len(report.plot_qualitative(qualitative, FIXTURES / "dataset", top_k=2).axes) == 3 * 2
    with pytest.raises(PipelineError, match="top_k 5 requested but the file ranks top_k = 3"):
        report.plot_qualitative(qualitative, FIXTURES / "dataset", top_k=5)
    with pytest.raises(PipelineError, match=r"synthetic_000017.png: image not found"):
        report.plot_qualitative(qualitative, FIXTURES / "missing")


# ---------------------------------------------------------------------------------------------------
# The stage (papermill)


def stage_args(tmp_path, out, **overrides):
    params = tmp_path / "params.yaml"
    params.write_text("report:\n  qualitative_top_k: 3\npeers:\n  recipes: [teran, selfalign]\n")  # the fixture ranks 3 of its 4 images
    paths = {"--eval-metrics": FIXTURES / "eval.json", "--benchmark": FIXTURES / "benchmark.json",
             "--qualitative": FIXTURES / "qualitative.json", "--dataset": FIXTURES / "dataset",
             "--sweep": FIXTURES / "sweep.json", "--peers": FIXTURES / "peers"}
    paths.update(overrides)
    args = ["--params", str(params), "--out", str(out), "--scratch", str(tmp_path / "build" / "report.in.ipynb"),
            "--live", *map(str, LIVE_DIRS)]
    for flag, path in paths.items():
        args += [flag, str(path)]
    return args


def test_stage_builds_identical_html(tmp_path, capsys):
    outs = [tmp_path / "reports-1", tmp_path / "reports-2"]
    for out in outs:
        assert report_stage.main(stage_args(tmp_path, out)) == 0
    assert capsys.readouterr().out.strip().endswith("reports-2/report.html")
    html = (outs[0] / "report.html").read_text()
    assert "328.2" in html and "466.6" in html and "31.6" in html  # rsum cells as the table shows them
    assert report.CHANCE_HEAD in html
    assert html.count("<img") == 6  # efficiency, systems, sweep, training curves, two qualitative grids
    assert "keeps 94.1% of the alignment head" in html
    assert "VinVL-large" in html and "unverified (third party)" in html  # the published anchors
    assert "Excluded experiment <code>exp-c</code>: also changes distill.lr" in html
    assert "tests/fixtures" not in html  # the parameter cells are removed
    assert (outs[0] / "report.html").read_bytes() == (outs[1] / "report.html").read_bytes()
    assert (outs[0] / "report.ipynb").is_file()
    figures = sorted(p.name for p in (outs[0] / "figures").iterdir())
    assert figures == ["efficiency_vs_effectiveness.png", "qualitative_alignment.png", "qualitative_matching.png",
                       "systems.png", "temperature_sweep.png", "training_curves.png"]
    for name in figures:
        assert (outs[0] / "figures" / name).read_bytes() == (outs[1] / "figures" / name).read_bytes()
    assert pd.read_csv(outs[0] / "tables" / "results.csv")["rsum"].tolist()[:2] == [466.6, 451.6]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_stage_missing_input_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "metrics" / "benchmark.json"
    assert report_stage.main(stage_args(tmp_path, tmp_path / "reports", **{"--benchmark": missing})) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {missing}: file not found (--benchmark)"]
    assert not (tmp_path / "reports").exists()


def test_stage_reports_bad_input_found_inside_the_notebook(tmp_path, capsys):
    dataset = tmp_path / "dataset"
    shutil.copytree(FIXTURES / "dataset", dataset)
    broken = dataset / "images" / "synthetic_000009.png"
    broken.write_bytes(b"not a png")  # exists, so only decoding it in the notebook finds the problem
    out = tmp_path / "reports"
    assert report_stage.main(stage_args(tmp_path, out, **{"--dataset": dataset})) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {broken}: cannot read image")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_heads_are_ordered_with_rerank_k_numerically(evaluation):
    metrics = copy.deepcopy(evaluation)
    for k in (100, 10, 50):
        metrics[f"rerank@{k}"] = copy.deepcopy(metrics["matching"])
    assert report.heads_of(metrics) == ["alignment", "matching", "rerank@10", "rerank@50", "rerank@100"]
