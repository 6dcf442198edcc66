"""aladin.losses against hand-computed matrices and naive double loops."""
import math

import pytest
import torch

from aladin.losses import hinge_triplet, listnet_distillation

# rows images, columns captions, positives on the diagonal
S3 = torch.tensor([[0.9, 0.1, 0.6],
                   [0.3, 0.4, 0.3],
                   [0.8, 0.0, 0.7]], dtype=torch.float64)


def naive_hinge(s, margin, max_violation):
    b = len(s)
    cost_s = [[max(0.0, margin + s[i][j] - s[i][i]) if i != j else 0.0 for j in range(b)] for i in range(b)]
    cost_im = [[max(0.0, margin + s[i][j] - s[j][j]) if i != j else 0.0 for j in range(b)] for i in range(b)]
    if max_violation:
        return (sum(max(cost_s[i]) for i in range(b))
                + sum(max(cost_im[i][j] for i in range(b)) for j in range(b)))
    return sum(map(sum, cost_s)) + sum(map(sum, cost_im))


def naive_listnet(student, teacher, temperature, eps):
    b = len(student)

    def softmax(xs):
        m = max(xs)
        e = [math.exp(x - m) for x in xs]
        return [v / sum(e) for v in e]

    rows = 0.0
    for i in range(b):
        pt, ps = softmax(teacher[i]), softmax([temperature * x for x in student[i]])
        rows += -sum(pt[j] * math.log(ps[j] + eps) for j in range(b))
    cols = 0.0
    for j in range(b):
        pt = softmax([teacher[i][j] for i in range(b)])
        ps = softmax([temperature * student[i][j] for i in range(b)])
        cols += -sum(pt[i] * math.log(ps[i] + eps) for i in range(b))
    return rows / b + cols / b


def test_hinge_hand_computed_2x2():
    s = torch.tensor([[0.5, 0.3], [0.6, 0.2]])
    # cost_s: (0, 1): 0.2+0.3-0.5 = 0; (1, 0): 0.2+0.6-0.2 = 0.6
    # cost_im: (1, 0): 0.2+0.6-0.5 = 0.3; (0, 1): 0.2+0.3-0.2 = 0.3
    for max_violation in (True, False):  # one negative per row and column: both variants agree
        assert hinge_triplet(s, 0.2, max_violation).item() == pytest.approx(0.6 + 0.3 + 0.3)


def test_hinge_hand_computed_3x3_variants():
    # cost_s rows (vs S[i,i] = 0.9, 0.4, 0.7): row 0: 0, 0; row 1: 0.1, 0.1; row 2: 0.3, 0
    # cost_im columns (vs S[j,j]): col 0: 0 (i=1), 0.1 (i=2); col 1: 0, 0; col 2: 0.1 (i=0), 0 (i=1)
    assert hinge_triplet(S3, 0.2, True).item() == pytest.approx((0 + 0.1 + 0.3) + (0.1 + 0 + 0.1))
    assert hinge_triplet(S3, 0.2, False).item() == pytest.approx((0 + 0.2 + 0.3) + (0.1 + 0 + 0.1))
    # margin 0: only row 2 / caption 0 (0.8 > 0.7) violates
    assert hinge_triplet(S3, 0.0, True).item() == pytest.approx(0.1)
    assert hinge_triplet(S3, 0.0, False).item() == pytest.approx(0.1)


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("margin", [0.0, 0.2, 1.5])
def test_hinge_matches_naive_loop(margin, max_violation):
    g = torch.Generator().manual_seed(3)
    for b in (2, 5, 8):
        s = torch.randn(b, b, generator=g, dtype=torch.float64)
        assert hinge_triplet(s, margin, max_violation).item() == pytest.approx(
            naive_hinge(s.tolist(), margin, max_violation), abs=1e-12)


def test_hinge_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        hinge_triplet(torch.zeros(2, 3))


# H(0.75) = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.75 * 0.2876820725 + 0.25 * 1.3862943611
H_075 = 0.5623351446
LN2 = 0.6931471806


def test_listnet_hand_computed_2x2():
    ln3 = math.log(3.0)
    teacher = torch.tensor([[ln3, 0.0], [0.0, ln3]], dtype=torch.float64)  # softmax of every row and column: (0.75, 0.25)
    # uniform student: every cross-entropy is ln 2 -> rows ln 2 + columns ln 2
    zeros = torch.zeros(2, 2, dtype=torch.float64)
    assert listnet_distillation(zeros, teacher, temperature=1.0).item() == pytest.approx(2 * LN2, abs=1e-8)
    # student row 0 / column 0 = (ln 3, 0) -> P_S = (0.75, 0.25), matching the teacher there:
    # rows: (H(0.75) + ln 2) / 2, columns: (H(0.75) + ln 2) / 2
    student = torch.tensor([[ln3, 0.0], [0.0, 0.0]], dtype=torch.float64)
    expected = (H_075 + LN2) / 2 + (H_075 + LN2) / 2  # = 1.2554823252
    assert listnet_distillation(student, teacher, temperature=1.0).item() == pytest.approx(expected, abs=1e-9)
    # the temperature multiplies the student only: student / 6 at temperature 6 gives the same loss
    assert listnet_distillation(student / 6, teacher, temperature=6.0).item() == pytest.approx(expected, abs=1e-9)
    # ... and does not touch the teacher: scaling the teacher changes the loss
    assert listnet_distillation(student, teacher * 6, temperature=1.0).item() != pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("temperature", [1.0, 6.0])
def test_listnet_matches_naive_loop(temperature):
    g = torch.Generator().manual_seed(7)
    for b in (2, 3, 6):
        student = torch.rand(b, b, generator=g, dtype=torch.float64) * 2 - 1  # cosines
        teacher = torch.randn(b, b, generator=g, dtype=torch.float64) * 4  # MrSw-like sums
        got = listnet_distillation(student, teacher, temperature=temperature).item()
        assert got == pytest.approx(naive_listnet(student.tolist(), teacher.tolist(), temperature, 1e-10), abs=1e-12)


def test_listnet_eps_is_added_after_the_softmax():
    # a student probability of ~e^-60 would give a cross-entropy of ~60 without eps; with eps 1e-10 the
    # log is capped near ln(1e-10) = -23.03 (the original form, ALADIN.md 3.3)
    student = torch.tensor([[10.0, -10.0], [-10.0, 10.0]], dtype=torch.float64)
    teacher = torch.tensor([[-50.0, 50.0], [50.0, -50.0]], dtype=torch.float64)
    got = listnet_distillation(student, teacher, temperature=3.0).item()
    assert got == pytest.approx(naive_listnet(student.tolist(), teacher.tolist(), 3.0, 1e-10), abs=1e-9)
    assert got == pytest.approx(2 * -math.log(1e-10), rel=1e-6)


def test_listnet_gradient_reaches_student_not_teacher():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=g, requires_grad=True)  # what produced the teacher
    teacher = weight * 3.0  # non-leaf, part of a graph
    student = torch.randn(4, 4, generator=g, requires_grad=True)
    loss = listnet_distillation(student, teacher)
    loss.backward()
    assert weight.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.requires_grad  # the caller's tensor is untouched; only the copy inside is detached


def test_listnet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        listnet_distillation(torch.zeros(2, 2), torch.zeros(3, 3))
