"""aladin.scoring against hand-computed cases and a naive loop over pairs, regions and words."""
import math

import pytest
import torch
import torch.nn.functional as F

from aladin.scoring import MODES, alignment_scores, select_alignment_tokens


def naive_scores(img, img_mask, txt, txt_mask, mode, zero_fill):
    """One pair at a time, one region and one word at a time, in Python floats."""
    n_img, n_reg, _ = img.shape
    n_txt, n_wrd, _ = txt.shape
    out = [[0.0] * n_txt for _ in range(n_img)]
    for i in range(n_img):
        for j in range(n_txt):
            regions = [r for r in range(n_reg) if img_mask[i, r]]
            words = [w for w in range(n_wrd) if txt_mask[j, w]]
            # the padded grid with 0 where a region or word is masked (the original's zero-fill)
            grid = [[float(img[i, r] @ txt[j, w]) if (r in regions and w in words) else 0.0
                     for w in range(n_wrd)] for r in range(n_reg)]

            def max_over_regions(w):
                if zero_fill:
                    return max(grid[r][w] for r in range(n_reg)) if n_reg else 0.0
                return max(grid[r][w] for r in regions) if regions else 0.0

            def max_over_words(r):
                if zero_fill:
                    return max(grid[r][w] for w in range(n_wrd)) if n_wrd else 0.0
                return max(grid[r][w] for w in words) if words else 0.0

            mrsw = sum(max_over_regions(w) for w in words)
            mwsr = sum(max_over_words(r) for r in regions)
            total = sum(grid[r][w] for r in regions for w in words)
            if mode == "MrSw":
                s = mrsw
            elif mode == "MrAVGw":
                s = mrsw / len(words) if words else 0.0
            elif mode == "MwSr":
                s = mwsr
            elif mode == "symm":
                s = mrsw + mwsr
            elif mode == "sum":
                s = total
            elif mode == "mean" and zero_fill:
                s = total / (n_reg * n_wrd)
            else:  # mean over valid pairs
                s = total / (len(regions) * len(words)) if regions and words else 0.0
            out[i][j] = s
    return torch.tensor(out, dtype=torch.float64)


def random_case(seed, n_img=4, n_txt=5, n_reg=4, n_wrd=6, dim=8):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_img, n_reg, dim, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n_txt, n_wrd, dim, generator=g, dtype=torch.float64), dim=-1)
    img_len = torch.randint(0, n_reg + 1, (n_img,), generator=g)
    txt_len = torch.randint(0, n_wrd + 1, (n_txt,), generator=g)
    img_len[0], txt_len[0] = n_reg, n_wrd  # one full-width item: no zero-fill clamp for it
    img_mask = torch.arange(n_reg)[None] < img_len[:, None]
    txt_mask = torch.arange(n_wrd)[None] < txt_len[:, None]
    return img, img_mask, txt, txt_mask


@pytest.mark.parametrize("zero_fill", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_matches_naive_loop(mode, zero_fill):
    for seed in range(3):
        img, img_mask, txt, txt_mask = random_case(seed)
        fast = alignment_scores(img, img_mask, txt, txt_mask, mode=mode, zero_fill=zero_fill)
        assert fast.shape == (4, 5)  # images on rows
        torch.testing.assert_close(fast, naive_scores(img, img_mask, txt, txt_mask, mode, zero_fill),
                                   rtol=0, atol=1e-12)


def test_hand_computed_pair():
    # regions (1, 0), (0, 1); words (0.6, 0.8), (-1, 0): a = [[0.6, -1], [0.8, 0]] (rows regions)
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    txt = torch.tensor([[[0.6, 0.8], [-1.0, 0.0]]])
    full_i, full_t = torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)
    expected = {
        "MrSw": 0.8 + 0.0,  # word 1: max(0.6, 0.8); word 2: max(-1, 0)
        "MrAVGw": 0.8 / 2,
        "MwSr": 0.6 + 0.8,  # region 1: max(0.6, -1); region 2: max(0.8, 0)
        "symm": 0.8 + 1.4,
        "sum": 0.6 - 1.0 + 0.8 + 0.0,
        "mean": (0.6 - 1.0 + 0.8 + 0.0) / 4,
    }
    for mode, value in expected.items():
        for zero_fill in (True, False):  # nothing is masked, so both agree
            got = alignment_scores(img, full_i, txt, full_t, mode=mode, zero_fill=zero_fill)
            assert got.item() == pytest.approx(value, abs=1e-6), mode

    # Mask region 2: word 2 then sees only a = -1. Zero-fill (Q7) clamps its max at 0, -inf does not.
    one_region = torch.tensor([[True, False]])
    assert alignment_scores(img, one_region, txt, full_t, "MrSw", zero_fill=True).item() == pytest.approx(0.6 + 0.0)
    assert alignment_scores(img, one_region, txt, full_t, "MrSw", zero_fill=False).item() == pytest.approx(0.6 - 1.0)
    assert alignment_scores(img, one_region, txt, full_t, "mean", zero_fill=True).item() == pytest.approx(-0.4 / 4)
    assert alignment_scores(img, one_region, txt, full_t, "mean", zero_fill=False).item() == pytest.approx(-0.4 / 2)


@pytest.mark.parametrize("mode", MODES)
def test_chunked_equals_unchunked(mode):
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(11, 5, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(13, 7, 16, generator=g), dim=-1)
    img_mask = torch.rand(11, 5, generator=g) < 0.7
    txt_mask = torch.rand(13, 7, generator=g) < 0.7
    for zero_fill in (True, False):
        whole = alignment_scores(img, img_mask, txt, txt_mask, mode, zero_fill)
        for chunk in (1, 3, 4, 11, 100):
            part = alignment_scores(img, img_mask, txt, txt_mask, mode, zero_fill, chunk_size=chunk)
            # Every pair's reductions are the same; only the BLAS kernel of the dot products may differ by
            # an ulp between block shapes (MKL picks small-matrix kernels for small blocks).
            torch.testing.assert_close(part, whole, rtol=0, atol=1e-5)
            assert torch.equal(part, alignment_scores(img, img_mask, txt, txt_mask, mode, zero_fill,
                                                      chunk_size=chunk))  # deterministic


def test_empty_sets_are_finite_with_finite_gradients():
    img = torch.randn(2, 3, 4, requires_grad=True)
    txt = torch.randn(3, 4, 4, requires_grad=True)
    for mode in MODES:
        for zero_fill in (True, False):
            img_tok, img_mask, txt_tok, txt_mask = select_alignment_tokens(
                img, torch.tensor([1, 3]), txt, torch.tensor([3, 4, 2]))  # image 0, captions 0 and 2 empty
            assert img_mask.sum(dim=1).tolist() == [0, 2] and txt_mask.sum(dim=1).tolist() == [0, 1, 0]
            s = alignment_scores(img_tok, img_mask, txt_tok, txt_mask, mode, zero_fill)
            assert torch.isfinite(s).all(), (mode, zero_fill)
            assert s[0].abs().sum() == 0 and s[:, 0].abs().sum() == 0 and s[:, 2].abs().sum() == 0
            img.grad = txt.grad = None
            s.sum().backward()
            assert torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all(), (mode, zero_fill)


def test_unknown_mode_names_mode_and_choices():
    img, img_mask, txt, txt_mask = random_case(0)
    with pytest.raises(ValueError, match="'MaxSum'.*MrSw.*MrAVGw.*MwSr.*symm.*sum.*mean"):
        alignment_scores(img, img_mask, txt, txt_mask, mode="MaxSum")


def test_selection_rules_hand_built():
    # caption: [CLS] w1 w2 w3 [SEP] pad pad (cap_len 5, width 7); token p = (p + 1, 1, 0), so every
    # position normalises to a different vector and each selected row can be traced back to it.
    positions = torch.arange(7, dtype=torch.float32)
    txt = torch.stack([positions + 1, torch.ones(7), torch.zeros(7)], dim=1)[None]  # (1, 7, 3)
    img = torch.stack([torch.arange(4, dtype=torch.float32) + 1, torch.zeros(4), torch.ones(4)], dim=1)[None]
    feat_len, cap_len = torch.tensor([3]), torch.tensor([5])

    img_tok, img_mask, txt_tok, txt_mask = select_alignment_tokens(img, feat_len, txt, cap_len, True, True)
    # regions: index 0 dropped; of original indices 1, 2, 3 only 1, 2 are real
    assert img_mask.tolist() == [[True, True, False]]
    torch.testing.assert_close(img_tok[0], F.normalize(img[0, 1:], dim=-1))
    # words (Q6): slice [1:-2] keeps original positions 1..4; lengths 5-3 = 2 -> positions 1, 2 valid
    # (w3, the last wordpiece, and [SEP] at 4 are masked)
    assert txt_mask.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(txt_tok[0], F.normalize(txt[0, 1:5], dim=-1))
    assert torch.allclose(txt_tok.norm(dim=-1), torch.ones(1, 4))

    _, _, txt_tok, txt_mask = select_alignment_tokens(img, feat_len, txt, cap_len, True, False)
    # without Q6: slice [1:] keeps positions 1..6; lengths 5-2 = 3 -> w1, w2, w3 valid, [SEP] masked
    assert txt_mask.tolist() == [[True, True, True, False, False, False]]
    torch.testing.assert_close(txt_tok[0], F.normalize(txt[0, 1:], dim=-1))

    img_tok, img_mask, _, _ = select_alignment_tokens(img, feat_len, txt, cap_len, False, True)
    # without Q5: all regions kept, the first three real
    assert img_mask.tolist() == [[True, True, True, False]]
    torch.testing.assert_close(img_tok[0], F.normalize(img[0], dim=-1))


def test_selection_full_width_caption_keeps_every_sliced_word():
    txt = torch.randn(1, 6, 4)
    _, _, txt_tok, txt_mask = select_alignment_tokens(torch.randn(1, 2, 4), torch.tensor([2]), txt, torch.tensor([6]))
    assert txt_tok.shape == (1, 3, 4) and txt_mask.tolist() == [[True, True, True]]


def test_selection_rejects_lengths_outside_the_tensor():
    with pytest.raises(ValueError, match="caption lengths must lie in \\[0, 7\\]"):
        select_alignment_tokens(torch.randn(1, 4, 3), torch.tensor([3]), torch.randn(1, 7, 3), torch.tensor([8]))


def test_zero_fill_clamp_from_selection_then_score():
    # End to end: a full-width image is not clamped, a shorter image in the same batch is (ALADIN.md 2.3).
    img = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.6, 0.8]],
                        [[9.0, 9.0], [1.0, 0.0], [0.0, 0.0]]])  # (2, 3, 2); image 1 has feat_len 2
    txt = torch.tensor([[[5.0, 5.0], [-1.0, 0.0], [7.0, 7.0], [7.0, 7.0]]])  # [CLS] word [SEP] pad
    sel = select_alignment_tokens(img, torch.tensor([3, 2]), txt, torch.tensor([3]), True, False)
    s = alignment_scores(*sel, mode="MrSw", zero_fill=True)
    # word (-1, 0): image 0 regions (1, 0), (0.6, 0.8) -> max(-1, -0.6) = -0.6, nothing padded;
    # image 1: region (1, 0) and a padded slot -> zero-fill gives max(-1, 0) = 0, -inf gives -1
    torch.testing.assert_close(s[:, 0], torch.tensor([-0.6, 0.0]))
    s = alignment_scores(*sel, mode="MrSw", zero_fill=False)
    torch.testing.assert_close(s[:, 0], torch.tensor([-0.6, -1.0]))
    assert not math.isnan(s.sum().item())
