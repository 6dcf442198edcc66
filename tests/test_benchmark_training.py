"""The training benchmark at a small size on the CPU: it runs the real data path and prints its figures."""
import json
import re

from aladin import benchmark_training


def run(capsys, *args):
    assert benchmark_training.main(["--size", "embedded", "--device", "cpu", "--batch-size", "8", "--steps", "2",
                                    "--warmup", "1", "--images", "4", "--regions", "12", *args]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[: out.rindex("}") + 1])
    return out, result


def figure(out, label):
    match = re.search(rf"^{re.escape(label)}: ([0-9.]+)$", out, re.MULTILINE)
    assert match, f"no '{label}' line in:\n{out}"
    return float(match.group(1))


def test_prints_positive_training_and_loader_throughput(capsys):
    out, result = run(capsys, "--precision", "bf16", "--recipe", "alignment,distillation,matching",
                      "--num-workers", "1")
    assert figure(out, "training samples/s") > 0 and figure(out, "data-loader samples/s") > 0
    assert re.search(r"^device: cpu  precision: bf16 ", out, re.MULTILINE)
    assert re.search(r"^peak host memory [0-9]+ MiB", out, re.MULTILINE)
    assert result["training_samples_per_s"] > 0 and result["loader_samples_per_s"] > 0
    assert result["precision"] == "bf16" and result["losses"] == ["alignment", "distillation", "matching"]
    assert result["regions_per_image"] == 12 and result["trainable_parameters"] == result["parameters"]


def test_head_only_recipe_trains_only_the_matching_head(capsys):
    _, result = run(capsys, "--recipe", "matching", "--freeze-backbone", "--num-workers", "0")
    assert 0 < result["trainable_parameters"] < result["parameters"]


def test_bad_recipe_is_one_error_line(capsys):
    assert benchmark_training.main(["--recipe", "alignment,contrastive"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "contrastive" in err[0]
