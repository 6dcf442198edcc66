"""VinVL X152-C4 detector: anchors, box coder, filters, checkpoint mapping, tiny end-to-end run (VINVL.md 2-4)."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import nms

from aladin import detector as D
from aladin import features
from aladin.config import ConfigError, FeaturesConfig
from aladin.io import PipelineError

TINY_TRUNK = FeaturesConfig(blocks=(1, 1, 1, 1), groups=1, width_per_group=64, stem_channels=8,
                            min_size=64, max_size=96)
TINY = D.DetectorConfig(features=TINY_TRUNK, num_classes=7, num_attributes=5, cls_emb_dim=4, attr_emb_dim=8,
                        max_attr_per_obj=3, pre_nms_top_n=200, post_nms_top_n=40)
TINY_LABELS = D.Labelmap(("__background__", "cat", "dog", "tree", "car", "sky", "man"),
                         ("__no_attribute__", "red", "big", "small", "green"))


# ---------------------------------------------------------------------------------------------------
# Anchors and the box coder


def test_cell_anchors_equal_the_spec_table():
    table = [  # VINVL.md 2.3, rows 0..14: ratio-major (0.5, 1, 2), size-minor (32..512)
        (-15, -4, 30, 19), (-38, -16, 53, 31), (-84, -40, 99, 55), (-176, -88, 191, 103), (-360, -184, 375, 199),
        (-8, -8, 23, 23), (-24, -24, 39, 39), (-56, -56, 71, 71), (-120, -120, 135, 135), (-248, -248, 263, 263),
        (-3, -14, 18, 29), (-14, -36, 29, 51), (-36, -80, 51, 95), (-80, -168, 95, 183), (-168, -344, 183, 359)]
    got = D.cell_anchors((32, 64, 128, 256, 512), (0.5, 1.0, 2.0))
    assert torch.equal(got, torch.tensor(table, dtype=torch.float32))
    assert D.DetectorConfig(features=D.X152C4).num_anchors == 15


def test_grid_anchor_index_is_cell_major():
    cells = D.cell_anchors((32,), (0.5, 1.0))  # A = 2
    grid = D.grid_anchors(cells, 2, 3)  # (H 2 x W 3 x A 2, 4)
    i, j, a = 1, 2, 1
    assert torch.equal(grid[(i * 3 + j) * 2 + a], cells[a] + torch.tensor([16.0 * j, 16.0 * i] * 2))


def test_decode_legacy_plus_one_by_hand():
    box = torch.tensor([[0.0, 0.0, 15.0, 15.0]])  # w = h = 16 under +1, centre (8, 8)
    same = D.decode_boxes(torch.zeros(1, 4), box, (1, 1, 1, 1))[:, 0]
    assert same.tolist() == [[0.0, 0.0, 15.0, 15.0]]
    # dx 0.5 -> centre 16; dw log 2 -> w 32: x1 = 16 - 16, x2 = 16 + 16 - 1
    d = torch.tensor([[0.5, 0.0, math.log(2.0), 0.0]])
    assert D.decode_boxes(d, box, (1, 1, 1, 1))[0, 0].tolist() == pytest.approx([0.0, 0.0, 31.0, 15.0])
    # the box head's weights (10, 10, 5, 5) divide the same deltas back
    d10 = torch.tensor([[5.0, 0.0, 5 * math.log(2.0), 0.0]])
    assert D.decode_boxes(d10, box, (10, 10, 5, 5))[0, 0].tolist() == pytest.approx([0.0, 0.0, 31.0, 15.0])
    # without +1: w = 15, centre 7.5 -> 15; w 30: x1 = 0, x2 = 30
    assert D.decode_boxes(d, box, (1, 1, 1, 1), plus_one=False)[0, 0].tolist() == pytest.approx(
        [0.0, 0.0, 30.0, 15.0])
    # dw is clamped at log(1000 / 16): w = 16 * 62.5 = 1000 around centre 8
    big = D.decode_boxes(torch.tensor([[0.0, 0.0, 10.0, 0.0]]), box, (1, 1, 1, 1))[0, 0]
    assert big.tolist() == pytest.approx([8 - 500, 0.0, 8 + 500 - 1, 15.0], rel=1e-6)


def test_decode_is_class_specific():
    box = torch.tensor([[10.0, 20.0, 29.0, 59.0]])  # w 20, h 40, centre (20, 40)
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0, 10.0, -10.0, 0.0, 0.0]])  # class 1: dx 1, dy -1 after /10
    out = D.decode_boxes(deltas, box, (10, 10, 5, 5))  # (1, 2, 4)
    assert out.shape == (1, 2, 4)
    assert out[0, 0].tolist() == pytest.approx([10.0, 20.0, 29.0, 59.0])
    assert out[0, 1].tolist() == pytest.approx([30.0, -20.0, 49.0, 19.0])


def test_clip_by_hand():
    box = torch.tensor([[-5.0, 3.0, 120.0, 50.0]])
    assert D.clip_boxes(box, 40, 100).tolist() == [[0.0, 3.0, 99.0, 39.0]]
    assert D.clip_boxes(box, 40, 100, plus_one=False).tolist() == [[0.0, 3.0, 100.0, 40.0]]


def test_iou_plus_one_by_hand():
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])  # 10 x 10 under +1
    b = torch.tensor([[5.0, 0.0, 14.0, 9.0]])  # overlap 5 x 10
    assert D.pairwise_iou(a, b).item() == pytest.approx(50 / 150)
    assert D.pairwise_iou(a, b, plus_one=False).item() == pytest.approx(36 / (81 + 81 - 36))


# ---------------------------------------------------------------------------------------------------
# Proposals


def test_proposals_by_hand():
    """One anchor (32 x 32) on a 1 x 3 map, image 20 x 40 (h x w); the third anchor moves onto the first."""
    cfg = replace(TINY, anchor_sizes=(32,), aspect_ratios=(1.0,))
    anchors = D.grid_anchors(D.cell_anchors(cfg.anchor_sizes, cfg.aspect_ratios), 1, 3)
    assert anchors.tolist() == [[-8, -8, 23, 23], [8, -8, 39, 23], [24, -8, 55, 23]]
    logits = torch.tensor([0.0, 2.0, 1.0]).reshape(1, 1, 1, 3)  # (B, A, H, W)
    deltas = torch.zeros(1, 4, 1, 3)
    deltas[0, 0, 0, 2] = -1.0  # dx -1: centre 40 - 32 = 8 -> (-8, -8, 23, 23), anchor 0's box
    boxes, scores = D.generate_proposals(logits, deltas, anchors, [(20, 40)], cfg)
    # by score: anchor 1 (8, 0, 39, 19); anchor 2 -> (0, 0, 23, 19); anchor 0 is the same box: IoU 1 > 0.7
    assert boxes[0].tolist() == [[8.0, 0.0, 39.0, 19.0], [0.0, 0.0, 23.0, 19.0]]
    assert scores[0].tolist() == pytest.approx([1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))])
    boxes, _ = D.generate_proposals(logits, deltas, anchors, [(20, 40)], replace(cfg, pre_nms_top_n=1))
    assert boxes[0].tolist() == [[8.0, 0.0, 39.0, 19.0]]
    boxes, _ = D.generate_proposals(logits, torch.zeros(1, 4, 1, 3), anchors, [(20, 40)],
                                    replace(cfg, post_nms_top_n=2))
    assert boxes[0].tolist() == [[8.0, 0.0, 39.0, 19.0], [24.0, 0.0, 39.0, 19.0]]  # IoU 320/640, kept


def test_proposal_layout_matches_anchor_order():
    """Deltas of anchor a at cell (i, j) sit in channels 4a..4a+3 (VINVL.md 2.3 layout)."""
    cfg = replace(TINY, anchor_sizes=(32, 64), aspect_ratios=(1.0,), rpn_nms=1.0)
    anchors = D.grid_anchors(D.cell_anchors(cfg.anchor_sizes, cfg.aspect_ratios), 2, 2)  # (8, 4)
    logits = torch.full((1, 2, 2, 2), -5.0)
    logits[0, 1, 1, 0] = 5.0  # anchor a = 1 at (i 1, j 0) -> index (1 * 2 + 0) * 2 + 1 = 5
    deltas = torch.zeros(1, 8, 2, 2)
    deltas[0, 4, 1, 0] = 0.25  # dx of anchor 1
    boxes, _ = D.generate_proposals(logits, deltas, anchors, [(1000, 1000)], cfg)
    expected = D.decode_boxes(torch.tensor([[0.25, 0, 0, 0]]), anchors[5:6], (1, 1, 1, 1))[0, 0]
    assert torch.equal(boxes[0][0], D.clip_boxes(expected, 1000, 1000))


# ---------------------------------------------------------------------------------------------------
# Filters against naive loops


def random_case(seed: int, r: int = 40, k: int = 12, per_class: bool = False):
    g = torch.Generator().manual_seed(seed)
    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([80.0, 60.0])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([30.0, 25.0]) + 1
        return torch.cat([xy, xy + wh], dim=1)
    b = boxes(r * k).reshape(r, k, 4) if per_class else boxes(r)
    temperature = (0.3, 1.0, 2.5)[seed % 3]  # flat to peaky: fewer or more than min_detections pass 0.2
    prob = torch.softmax(torch.randn(r, k, generator=g) * temperature, dim=1)
    return b, prob


def naive_mode1(boxes, prob, cfg):
    r, k = prob.shape
    grow = torch.tensor([0.0, 0.0, 1.0, 1.0]) if cfg.legacy_plus_one else torch.zeros(4)
    survived = [[False] * k for _ in range(r)]
    for j in range(1, k):  # the original: one NMS per foreground class
        bj = boxes if boxes.dim() == 2 else boxes[:, j]
        for i in nms(bj + grow, prob[:, j], cfg.filter1_nms).tolist():
            survived[i][j] = True
    rows = []
    for i in range(r):
        best, label = 0.0, 0
        for j in range(1, k):
            if survived[i][j] and prob[i, j].item() > best:
                best, label = prob[i, j].item(), j
        if best > 0:
            rows.append((best, i, label))
    rows.sort(key=lambda t: -t[0])
    n = sum(1 for s, _, _ in rows if s >= cfg.score_thresh)
    return rows[: min(max(n, cfg.min_detections), cfg.max_detections)]


def iou_plus(a, b, one):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + one)
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + one)
    inter = iw * ih
    area = lambda x: (x[2] - x[0] + one) * (x[3] - x[1] + one)
    return inter / (area(a) + area(b) - inter)


def naive_mode2(boxes, prob, cfg):
    one = 1.0 if cfg.legacy_plus_one else 0.0
    cands = []
    for i in range(len(prob)):
        row = prob[i, 1:].tolist()
        s = max(row)
        box = boxes[i].tolist()
        if box[2] - box[0] + one >= 0 and box[3] - box[1] + one >= 0 and s > cfg.score_thresh * 0.01:
            cands.append((s, i, row.index(s) + 1, box))
    cands.sort(key=lambda t: -t[0])
    kept = []
    for c in cands:  # greedy NMS, written out
        if all(iou_plus(c[3], k[3], one) <= cfg.nms for k in kept):
            kept.append(c)
    n = sum(1 for c in kept if c[0] >= cfg.score_thresh)
    return [c[:3] for c in kept[: min(max(n, cfg.min_detections), cfg.max_detections)]]


def as_rows(result):
    idx, labels, scores = result
    return [(s, i, l) for s, i, l in zip(scores.tolist(), idx.tolist(), labels.tolist())]


def assert_same_rows(got, want):
    assert [(i, l) for _, i, l in got] == [(i, l) for _, i, l in want]
    assert [s for s, _, _ in got] == pytest.approx([s for s, _, _ in want], abs=0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("plus_one", [True, False])
@pytest.mark.parametrize("per_class", [False, True])
def test_filter1_equals_per_class_loop(seed, plus_one, per_class):
    boxes, prob = random_case(seed, per_class=per_class)
    for lo, hi in ((10, 100), (3, 6), (1, 2)):
        cfg = replace(TINY, num_classes=12, legacy_plus_one=plus_one, min_detections=lo, max_detections=hi,
                      class_chunk=5)
        assert_same_rows(as_rows(D.filter_per_class(boxes, prob, cfg)), naive_mode1(boxes, prob, cfg))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("plus_one", [True, False])
def test_filter2_equals_naive_loop(seed, plus_one):
    boxes, prob = random_case(seed + 100)
    for lo, hi in ((10, 100), (3, 6)):
        cfg = replace(TINY, num_classes=12, nms_filter=2, legacy_plus_one=plus_one, min_detections=lo,
                      max_detections=hi)
        assert_same_rows(as_rows(D.filter_class_agnostic(boxes, prob, cfg)), naive_mode2(boxes, prob, cfg))


def test_filter1_label_is_best_surviving_class():
    """Box 1 loses class 1 to box 0 (IoU > 0.3) and keeps its second-best class 2 (VINVL.md 4.2 step 2)."""
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [1.0, 0.0, 10.0, 9.0], [50.0, 50.0, 59.0, 59.0]])
    prob = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.6, 0.3], [0.45, 0.35, 0.2]])
    cfg = replace(TINY, num_classes=3, min_detections=1)
    idx, labels, scores = D.filter_per_class(boxes, prob, cfg)
    assert idx.tolist() == [0, 2, 1]  # box 2 keeps class 1 at 0.35 (far from box 0); sorted by score
    assert labels.tolist() == [1, 1, 2]
    assert scores.tolist() == pytest.approx([0.8, 0.35, 0.3])


def test_filter2_needs_ignored_regression():
    with pytest.raises(ConfigError, match="ignore_box_regression"):
        replace(TINY, nms_filter=2, ignore_box_regression=False)


# ---------------------------------------------------------------------------------------------------
# Checkpoint


def official_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of `vinvl_vg_x152c4.pth` with its shape, from the scheme of VINVL.md 3.3 (after `module.`)."""
    bn = ("weight", "bias", "running_mean", "running_var")
    keys: dict[str, tuple[int, ...]] = {"backbone.body.stem.conv1.weight": (64, 3, 7, 7)}
    keys.update({f"backbone.body.stem.bn1.{b}": (64,) for b in bn})

    def stage(prefix, blocks, w, c_in0):
        c_out = w  # ResNeXt 32x8d: width equals the stage output
        for i in range(blocks):
            c_in = c_in0 if i == 0 else c_out
            p = f"{prefix}.{i}."
            keys[p + "conv1.weight"] = (w, c_in, 1, 1)
            keys[p + "conv2.weight"] = (w, w // 32, 3, 3)
            keys[p + "conv3.weight"] = (c_out, w, 1, 1)
            for n, size in (("bn1", w), ("bn2", w), ("bn3", c_out)):
                keys.update({f"{p}{n}.{b}": (size,) for b in bn})
            if i == 0:
                keys[p + "downsample.0.weight"] = (c_out, c_in, 1, 1)
                keys.update({f"{p}downsample.1.{b}": (c_out,) for b in bn})

    stage("backbone.body.layer1", 3, 256, 64)
    stage("backbone.body.layer2", 8, 512, 256)
    stage("backbone.body.layer3", 36, 1024, 512)
    assert len(keys) == 725
    keys["rpn.anchor_generator.cell_anchors.0"] = (15, 4)
    keys.update({"rpn.head.conv.weight": (1024, 1024, 3, 3), "rpn.head.conv.bias": (1024,),
                 "rpn.head.cls_logits.weight": (15, 1024, 1, 1), "rpn.head.cls_logits.bias": (15,),
                 "rpn.head.bbox_pred.weight": (60, 1024, 1, 1), "rpn.head.bbox_pred.bias": (60,)})
    stage("roi_heads.box.feature_extractor.head.layer4", 3, 2048, 1024)
    keys.update({"roi_heads.box.predictor.cls_score.weight": (1595, 2048),
                 "roi_heads.box.predictor.cls_score.bias": (1595,),
                 "roi_heads.box.predictor.bbox_pred.weight": (6380, 2048),
                 "roi_heads.box.predictor.bbox_pred.bias": (6380,)})
    stage("attribute.feature_extractor.head.layer4", 3, 2048, 1024)
    keys.update({"attribute.predictor.cls_embedding.weight": (1595, 256),
                 "attribute.predictor.fc_attr.weight": (512, 2304), "attribute.predictor.fc_attr.bias": (512,),
                 "attribute.predictor.attr_score.weight": (525, 512), "attribute.predictor.attr_score.bias": (525,)})
    return keys


def meta_state(shapes: dict, prefix: str = "module.") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.fixture(scope="module")
def x152():
    with torch.device("meta"):  # the full architecture at no memory cost
        return D.vinvl_x152c4()


def test_official_keys_count():
    shapes = official_shapes()
    assert len(shapes) == 841
    unique = {k for k in shapes if not k.startswith("attribute.feature_extractor.")}
    assert len(unique) == 791


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_every_official_key_maps(x152, prefix):
    shapes = official_shapes()
    mapping = D.load_vinvl_weights(x152, meta_state(shapes, prefix))
    ours = x152.state_dict()
    assert len(mapping) == len(ours) == 790  # 791 unique minus the recomputed anchors
    assert set(mapping.values()) == set(ours)
    checked = set(shapes) - set(mapping)
    assert checked == {"rpn.anchor_generator.cell_anchors.0"} | {
        k for k in shapes if k.startswith("attribute.feature_extractor.")}
    assert mapping["backbone.body.layer3.35.conv2.weight"] == "backbone.layer3.35.conv2.weight"
    assert mapping["roi_heads.box.feature_extractor.head.layer4.0.downsample.1.running_var"] == \
        "roi_head.layer4.0.downsample.1.running_var"
    assert mapping["attribute.predictor.fc_attr.weight"] == "attribute.fc_attr.weight"
    assert sum(math.prod(s) for k, s in shapes.items()
               if not k.startswith("attribute.feature_extractor.")) == 148_332_155  # 593.3 MB fp32


def test_model_without_attributes_takes_the_full_checkpoint():
    with torch.device("meta"):
        model = D.vinvl_x152c4(attributes=False)
    mapping = D.load_vinvl_weights(model, meta_state(official_shapes()))
    assert not any(k.startswith("attribute.") for k in mapping)


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("module.backbone.body.layer2.7.bn3.running_mean"),
     "misses 'module.backbone.body.layer2.7.bn3.running_mean'"),
    (lambda sd: sd.pop("module.attribute.predictor.attr_score.bias"), "misses 'module.attribute.predictor"),
    (lambda sd: sd.__setitem__("module.roi_heads.box.predictor.cls_score.weight", torch.empty(1594, 2048,
                                                                                             device="meta")),
     r"'module.roi_heads.box.predictor.cls_score.weight' has shape \[1594, 2048\]"),
    (lambda sd: sd.__setitem__("module.rpn.head.extra.weight", torch.empty(3, device="meta")),
     "'module.rpn.head.extra.weight' is unexpected"),
    (lambda sd: sd.__setitem__("module.roi_heads.mask.predictor.weight", torch.empty(3, device="meta")),
     "'module.roi_heads.mask.predictor.weight' is unexpected"),
    (lambda sd: sd.__setitem__("module.backbone.body.layer1.0.bn1.num_batches_tracked",
                               torch.empty((), device="meta")),
     "'module.backbone.body.layer1.0.bn1.num_batches_tracked' is unexpected"),
    (lambda sd: sd.__setitem__("module.attribute.feature_extractor.head.layer4.0.conv1.weight",
                               torch.empty(1, device="meta")),
     "'module.attribute.feature_extractor.head.layer4.0.conv1.weight' differs"),
])
def test_bad_checkpoints_name_the_key(x152, edit, match):
    sd = meta_state(official_shapes())
    edit(sd)
    with pytest.raises(PipelineError, match=match):
        D.load_vinvl_weights(x152, sd)


def tiny_official_state(model: D.VinVLDetector) -> dict[str, torch.Tensor]:
    """The tiny model's weights renamed to the official scheme, with the anchors and the res5 copy."""
    inverse = {ours: off for off, ours in D._inverse_names(model.state_dict())}
    sd = {"module." + inverse[k]: v.clone() for k, v in model.state_dict().items()}
    sd["module.rpn.anchor_generator.cell_anchors.0"] = D.cell_anchors(TINY.anchor_sizes, TINY.aspect_ratios)
    for k in list(sd):
        if k.startswith("module.roi_heads.box.feature_extractor."):
            sd[k.replace("roi_heads.box.", "attribute.")] = sd[k].clone()
    return sd


def test_load_copies_values_and_checks_duplicates():
    src = D.build_detector(TINY, seed=1)
    dst = D.build_detector(TINY, seed=2)
    sd = tiny_official_state(src)
    D.load_vinvl_weights(dst, sd)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    bad = dict(sd)
    bad["module.attribute.feature_extractor.head.layer4.0.conv1.weight"] = \
        sd["module.attribute.feature_extractor.head.layer4.0.conv1.weight"] + 1
    with pytest.raises(PipelineError, match="differs from 'module.roi_heads.box.feature_extractor"):
        D.load_vinvl_weights(dst, bad)
    bad = dict(sd)
    bad["module.rpn.anchor_generator.cell_anchors.0"] = sd["module.rpn.anchor_generator.cell_anchors.0"] + 1
    with pytest.raises(PipelineError, match="cell_anchors.0' does not equal"):
        D.load_vinvl_weights(dst, bad)


def test_read_checkpoint(tmp_path):
    sd = {"module.rpn.head.conv.bias": torch.arange(3.0)}
    torch.save(sd, tmp_path / "bare.pth")
    torch.save({"model": sd}, tmp_path / "wrapped.pth")
    for name in ("bare.pth", "wrapped.pth"):
        got = D.read_checkpoint(tmp_path / name)
        assert list(got) == ["module.rpn.head.conv.bias"] and torch.equal(got["module.rpn.head.conv.bias"],
                                                                           sd["module.rpn.head.conv.bias"])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="junk.pth: not a loadable"):
        D.read_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(PipelineError, match="missing.pth: file not found"):
        D.read_checkpoint(tmp_path / "missing.pth")
    torch.save({"model": {"a": 1}}, tmp_path / "odd.pth")
    with pytest.raises(PipelineError, match="odd.pth: entry 'a' is a int"):
        D.read_checkpoint(tmp_path / "odd.pth")


# ---------------------------------------------------------------------------------------------------
# Label map


def test_load_labelmap(tmp_path):
    path = tmp_path / "labelmap.json"
    path.write_text(json.dumps({"label_to_idx": {"dog": 2, "cat": 1}, "attribute_to_idx": {"red": 1},
                                "idx_to_label": {"1": "cat", "2": "dog"}}))
    lm = D.load_labelmap(path)
    assert lm.classes == ("__background__", "cat", "dog")
    assert lm.attributes == ("__no_attribute__", "red")
    path.write_text(json.dumps({"label_to_idx": {"dog": 2, "cat": 2}}))
    with pytest.raises(PipelineError, match=r"labelmap.json: label_to_idx\['cat'\] = 2"):
        D.load_labelmap(path)
    path.write_text(json.dumps({"labels": []}))
    with pytest.raises(PipelineError, match="labelmap.json: key 'label_to_idx'"):
        D.load_labelmap(path)


# ---------------------------------------------------------------------------------------------------
# The tiny detector end to end


def images():
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (48, 70, 3), dtype=np.uint8))  # resized to 93 x 64
    b = Image.fromarray(rng.integers(0, 256, (90, 60, 3), dtype=np.uint8))
    return [a, b]


@pytest.fixture(scope="module")
def tiny():
    return D.build_detector(TINY, seed=0)


def check_regions(regions, imgs, cfg):
    for r, image in zip(regions, imgs):
        n = len(r.boxes)
        assert cfg.min_detections <= n <= cfg.max_detections
        assert len(r.classes) == len(r.confs) == n and r.features.shape == (n, 256)
        assert len(r.attributes) == len(r.attr_scores) == (n if cfg.attributes else 0)
        assert r.confs == sorted(r.confs, reverse=True)
        b = np.array(r.boxes)
        assert (b >= 0).all() and (b[:, [0, 2]] <= image.width).all() and (b[:, [1, 3]] <= image.height).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert set(r.classes) <= set(TINY_LABELS.classes[1:])
        assert (r.features >= 0).all()  # post-ReLU means
        assert all(set(a) <= set(TINY_LABELS.attributes[1:]) for a in r.attributes)
        assert all(all(s > cfg.attr_threshold for s in ss) for ss in r.attr_scores)


def test_tiny_detector_end_to_end(tiny):
    imgs = images()
    regions = D.detect(tiny, imgs, TINY_LABELS, image_ids=[7, 9])
    assert [r.image_id for r in regions] == [7, 9]
    assert [(r.width, r.height) for r in regions] == [(70, 48), (60, 90)]
    check_regions(regions, imgs, TINY)
    again = D.detect(tiny, imgs, TINY_LABELS, image_ids=[7, 9])
    for x, y in zip(regions, again):
        assert x.boxes == y.boxes and x.classes == y.classes and x.confs == y.confs
        assert x.features.tobytes() == y.features.tobytes() and x.attributes == y.attributes
    # rows are written unchanged by the feature writer (sorted already)
    assert regions[0].sorted_by_conf().boxes == regions[0].boxes


def test_tiny_detector_features_are_the_pooled_proposals(tiny):
    """The region feature equals `features_for_boxes` at the output box (no regression: the proposal)."""
    imgs = images()[:1]
    r = D.detect(tiny, imgs, TINY_LABELS)[0]
    ref = features.features_for_boxes(tiny, imgs, [np.array(r.boxes)])[0]
    np.testing.assert_allclose(r.features, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change", [dict(nms_filter=2), dict(ignore_box_regression=False),
                                    dict(legacy_plus_one=False, attributes=False)])
def test_tiny_detector_modes(change):
    cfg = replace(TINY, **change)
    model = D.build_detector(cfg, seed=0)
    with torch.no_grad():  # confident classes so the count sits strictly between min and max
        model.box_predictor.cls_score.weight.mul_(20.0)
    cfg_counts = replace(cfg, min_detections=2, max_detections=30)
    model.config = cfg_counts
    model.rpn.cfg = cfg_counts
    imgs = images()
    regions = D.detect(model, imgs, TINY_LABELS)
    check_regions(regions, imgs, cfg_counts)
    assert all(2 < len(r.boxes) < 30 for r in regions)  # the count is n(score >= 0.2), not a bound
    assert all(len(set(r.confs)) == len(r.confs) for r in regions)
    if not cfg.attributes:
        assert all(r.attributes == [] for r in regions)


def test_detect_rejects_a_wrong_labelmap(tiny):
    with pytest.raises(PipelineError, match="label map has 3 classes"):
        D.detect(tiny, images(), D.Labelmap(("__background__", "a", "b"), TINY_LABELS.attributes))
