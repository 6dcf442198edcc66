import json

import pytest
import torch

from aladin import benchmark_extractor


def test_benchmark_prints_throughput_and_memory(capsys):
    assert benchmark_extractor.main(["--tiny", "--images", "3", "--batch-size", "2", "--height", "64",
                                     "--width", "96"]) == 0
    out = capsys.readouterr().out
    figures = json.loads(out[: out.rindex("}") + 1])
    assert figures["images"] == 4  # whole batches: ceil(3 / 2) * 2
    assert figures["image_size"] == [64, 96] and figures["model"] == "tiny"
    assert figures["images_per_s"] == pytest.approx(figures["images"] / figures["seconds"])
    assert figures["peak_host_memory_mib"] > 0
    assert "images/s" in out.splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without CUDA")
def test_cuda_without_a_gpu_is_one_clear_error(capsys):
    assert benchmark_extractor.main(["--device", "cuda", "--tiny"]) == 1
    assert capsys.readouterr().err.strip() == "error: --device cuda but no CUDA device is available"
