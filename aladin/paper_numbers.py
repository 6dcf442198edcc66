"""Published reference numbers the report prints beside ours, each with its source and reliability label.

Transcribed from the project's `PAPER_NUMBERS.md` (sections 1-5 and 8), which says where each number was read.
Labels: `verified` (the authors' own repository or results file), `unverified (aggregator)`,
`unverified (third party)`, `derived` (arithmetic on listed numbers). Recalls are percentages; a missing
value (not published, or not available) is None and never 0. `protocol` uses the evaluator's names:
`vinvl_1k` (one 1K key file), `coco_1k_5fold` (mean of 5 folds of 1K), `coco_5k` (all 5K test images).
"""
from __future__ import annotations

from dataclasses import dataclass

Recalls = tuple[float | None, float | None, float | None]  # R@1, R@5, R@10


@dataclass(frozen=True)
class Anchor:
    system: str
    protocol: str
    i2t: Recalls
    t2i: Recalls
    status: str
    source: str
    note: str = ""

    @property
    def rsum(self) -> float | None:
        """The six-recall sum (derived), or None when a recall is not published."""
        values = [*self.i2t, *self.t2i]
        return None if any(v is None for v in values) else round(sum(values), 1)


ANCHORS: tuple[Anchor, ...] = (
    # PAPER_NUMBERS.md 1.2: the ALADIN paper's tables were not available; the aggregator's row, variant not stated.
    Anchor("ALADIN (paperswithcode row)", "coco_5k", (64.9, 88.6, 94.5), (51.3, 79.2, 87.5),
           "unverified (aggregator)", "paperswithcode, Cross-Modal Retrieval on COCO 2014",
           "variant not stated; most plausibly the distilled matching head"),
    # 2: TERAN and TERN, single models.
    Anchor("TERAN", "coco_1k_5fold", (77.7, 95.9, 98.6), (65.0, 91.2, 96.4), "unverified (third party)",
           "Paranioar/Awesome_Matching_Pretraining_Transfering performance.md"),
    Anchor("TERAN", "coco_5k", (55.6, 83.9, 91.6), (42.6, 72.5, 82.9), "unverified (third party)",
           "Paranioar/Awesome_Matching_Pretraining_Transfering performance.md"),
    Anchor("TERN", "coco_1k_5fold", (63.7, 90.5, 96.2), (51.9, 85.6, 93.6), "unverified (third party)",
           "Paranioar/Awesome_Matching_Pretraining_Transfering performance.md", "1K protocol not stated by the source"),
    Anchor("TERN", "coco_5k", (38.4, 69.5, 81.3), (28.7, 59.7, 72.7), "unverified (third party)",
           "Paranioar/Awesome_Matching_Pretraining_Transfering performance.md"),
    # 4.1: the VinVL / Oscar cross-encoders (ALADIN's teacher family).
    Anchor("VinVL-base", "vinvl_1k", (89.8, 98.8, 99.7), (78.2, 95.6, 98.0), "unverified (third party)",
           "cattidea/VinVL-Paddle README quoting the VinVL paper's Table 2",
           "single key file or 5-fold is open (pzzhang/VinVL #25)"),
    Anchor("VinVL-base", "coco_5k", (74.6, 92.6, None), (58.1, 83.2, 90.1), "verified",
           "microsoft/Oscar VINVL_MODEL_ZOO.md", "t2i R@10 derived from ALADIN's efficiency plot"),
    Anchor("VinVL-large", "coco_5k", (75.4, 92.9, 96.2), (58.8, 83.5, 90.3), "verified",
           "microsoft/Oscar VINVL_MODEL_ZOO.md", "R@10 unverified (salesforce/LAVIS dataset card)"),
    Anchor("Oscar-base", "coco_5k", (70.0, 91.1, None), (54.0, 80.8, 88.5), "verified",
           "microsoft/Oscar MODEL_ZOO.md", "t2i R@10 derived from ALADIN's efficiency plot"),
    Anchor("Oscar-large", "coco_5k", (73.5, 92.2, 96.0), (57.5, 82.8, 89.8), "verified",
           "microsoft/Oscar MODEL_ZOO.md", "R@10 unverified (salesforce/LAVIS dataset card)"),
    # 5: an independent-embedding model of the same era, for scale.
    Anchor("VSE∞ (BUTD region + BERT)", "coco_1k_5fold", (79.7, 96.4, None), (64.8, 91.4, None), "verified",
           "woodfrog/vse_infty README"),
)


@dataclass(frozen=True)
class EfficiencyPoint:
    """One point of the paper's efficiency-vs-effectiveness plot (PAPER_NUMBERS.md 1.3, 8).

    `latency_s` is the plotted constant (the code's value x 5, probably scaling a 1K per-query latency to
    5K; inferred). `t2i_rsum` is the plot's "rsum", most likely t2i R@1+R@5+R@10 on COCO 5K (inferred).
    """

    system: str
    kind: str  # our mode it corresponds to, or "" for systems we do not build
    latency_s: float
    t2i_rsum: float


# mesnico/ALADIN alad/plots/plot_efficiency_vs_effectiveness.py (commit d1bd7bf): constants typed into the script.
EFFICIENCY_SOURCE = "mesnico/ALADIN alad/plots/plot_efficiency_vs_effectiveness.py (constants; meaning inferred)"
EFFICIENCY: tuple[EfficiencyPoint, ...] = (
    EfficiencyPoint("ALADIN A/ft. + D/ft.", "matching", 0.023 * 5, 215.0),
    EfficiencyPoint("ALADIN A/ft.", "alignment", 0.098 * 5, 224.0),
    EfficiencyPoint("VinVL", "crossencoder", 2.06 * 5, 231.4),
    EfficiencyPoint("Oscar", "", 2.06 * 5, 223.3),
    EfficiencyPoint("TERAN", "", 0.075 * 5, 204.1),
    EfficiencyPoint("TERN", "", 0.019 * 5, 169.2),
)


def paper_point(kind: str) -> EfficiencyPoint:
    return next(p for p in EFFICIENCY if p.kind == kind)


def paper_speedups() -> dict[str, float]:
    """The ratios behind "almost 90 times faster" (PAPER_NUMBERS.md 8): 89.6, 21.0 and 4.3."""
    m, a, x = (paper_point(k).latency_s for k in ("matching", "alignment", "crossencoder"))
    return {"matching_vs_crossencoder": x / m, "alignment_vs_crossencoder": x / a, "matching_vs_alignment": a / m}
