import torch

from aladin.retrieval import _percentile, top_images


def test_top_images_reads_columns_of_an_images_by_captions_matrix():
    sims = torch.tensor([[0.1, 0.9, 0.3],
                         [0.8, 0.2, 0.4],
                         [0.5, 0.7, 0.6]])  # (3 images, 3 captions)
    assert top_images(sims, [0, 1], k=2) == [[1, 2], [0, 2]]
    assert top_images(sims, [2], k=10) == [[2, 1, 0]]  # k is capped at the gallery size


def test_percentile_is_the_nearest_rank_by_hand():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert _percentile(values, 0.5) == 3.0
    assert _percentile(values, 0.95) == 5.0  # round(0.95 * 4) = 4 -> the largest
    assert _percentile(values, 0.0) == 1.0
