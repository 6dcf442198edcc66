"""Reading a VinVL region-feature folder: region vectors and object tags by image id (VINVL.md 6.3-6.7).

Kept apart from the extractor (`aladin.features`), so that training and evaluation depend only on the
file format, not on how the features were made.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path

import numpy as np

from .io import PipelineError, read_json
from .tsv import TSVFile


class RegionFeatures:
    """Region vectors and object tags by image id from a VinVL feature folder (ALADIN.md 6.3-6.4).

    `feats, tags = rf[image_id]`: feats (N, dim) float32 in stored order, tags = the `class` of every
    object in predictions.tsv, stored order. Malformed input raises `PipelineError` naming file and line.
    """

    def __init__(self, directory: str | Path, expected_dim: int | None = None):
        self.directory = Path(directory)
        self.index_path = self.directory / "imageid2idx.json"
        index = read_json(self.index_path)
        if not isinstance(index, dict):
            raise PipelineError(f"{self.index_path}: expected an object {{image id: row}}, got {type(index).__name__}")
        self.features = TSVFile(self.directory / "features.tsv", expected_columns=3)
        self.predictions = TSVFile(self.directory / "predictions.tsv", expected_columns=2)
        for key, row in index.items():
            if not re.fullmatch(r"-?[0-9]+", key) or isinstance(row, bool) or not isinstance(row, int) \
                    or not 0 <= row < len(self.features):
                raise PipelineError(f"{self.index_path}: entry {key!r}: {row!r} is not an integer image id "
                                    f"with a row of features.tsv (rows 0..{len(self.features) - 1} by "
                                    f"{self.features.idx_path.name})")
        self.index: dict[str, int] = index
        self._prediction_rows: dict[str, int] | None = None
        self.dim = self._row_dim(0) if len(self.features) else (expected_dim or 0)
        if expected_dim is not None and self.dim != expected_dim:
            raise PipelineError(f"{self.features.path}: the features have D+6 = {self.dim} values per region but "
                                f"params model.img_feature_dim is {expected_dim}")

    @property
    def image_ids(self) -> list[int]:
        """Image ids in row order."""
        return [int(k) for k, _ in sorted(self.index.items(), key=lambda kv: kv[1])]

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, image_id) -> bool:
        return str(image_id) in self.index

    def _decode(self, row: int) -> tuple[str, int, bytes]:
        image_id, count, payload = self.features[row]
        where = f"{self.features.path}:{row + 1}"
        if not count.isdigit() or int(count) == 0:
            raise PipelineError(f"{where}: num_boxes {count!r} is not a positive integer")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise PipelineError(f"{where}: feature column is not valid base64 ({e})") from None
        return image_id, int(count), raw

    def _row_dim(self, row: int) -> int:
        _, count, raw = self._decode(row)
        if len(raw) % (4 * count):
            raise PipelineError(f"{self.features.path}:{row + 1}: {len(raw)} bytes do not hold {count} rows of "
                                f"float32 values")
        return len(raw) // (4 * count)

    def __getitem__(self, image_id) -> tuple[np.ndarray, list[str]]:
        key = str(image_id)
        if key not in self.index:
            raise PipelineError(f"{self.index_path}: image id {key} not found")
        row = self.index[key]
        stored_id, count, raw = self._decode(row)
        where = f"{self.features.path}:{row + 1}"
        if stored_id != key:
            raise PipelineError(f"{where}: row holds image id {stored_id}, but {self.index_path.name} maps {key} here")
        if len(raw) != count * self.dim * 4:
            raise PipelineError(f"{where}: {len(raw)} bytes of features, expected num_boxes x dim x 4 = "
                                f"{count} x {self.dim} x 4 = {count * self.dim * 4} (truncated or malformed row)")
        feats = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(count, self.dim)  # (N, D + 6)
        bad = np.argwhere(~np.isfinite(feats))
        if len(bad):  # one NaN region would turn every loss of its batches into NaN, far from the cause
            r, c = bad[0]
            raise PipelineError(f"{where}: region {r} value {c} is {feats[r, c]}; features must be finite "
                                f"({len(bad)} non-finite values in this row)")
        return feats, self._tags(key, row)

    def _tags(self, key: str, row: int) -> list[str]:
        # Our writer keeps predictions.tsv in features.tsv's row order; other dumps may not, so fall back
        # to a one-time scan by image id (as Oscar's retrieval reader does).
        cols = self.predictions[row] if row < len(self.predictions) else None
        if cols is None or cols[0] != key:
            if self._prediction_rows is None:
                self._prediction_rows = {self.predictions[i][0]: i for i in range(len(self.predictions))}
            if key not in self._prediction_rows:
                raise PipelineError(f"{self.predictions.path}: no row for image id {key}")
            row = self._prediction_rows[key]
            cols = self.predictions[row]
        where = f"{self.predictions.path}:{row + 1}"
        try:
            result = json.loads(cols[1])
        except json.JSONDecodeError as e:
            raise PipelineError(f"{where}: column 2 is not valid JSON ({e.msg})") from None
        objects = result.get("objects") if isinstance(result, dict) else result  # released: dict or bare list
        if not isinstance(objects, list) or not all(isinstance(o, dict) and isinstance(o.get("class"), str)
                                                    for o in objects):
            raise PipelineError(f"{where}: expected a list of objects with a 'class' string")
        return [o["class"] for o in objects]


def check_model_dim(features: RegionFeatures, model_dir) -> None:
    """The region vectors fit the image embedding of the backbone or model folder `model_dir`: its
    config.json's img_feature_dim must equal the features' D + 6, else the first forward fails with a bare
    shape error (a backbone written for other params, or features of another extractor)."""
    path = Path(model_dir) / "config.json"
    config = read_json(path)
    dim = config.get("img_feature_dim") if isinstance(config, dict) else None
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise PipelineError(f"{path}: missing key 'img_feature_dim' (an integer)")
    if dim != features.dim:
        raise PipelineError(f"{path}: img_feature_dim is {dim}, but the region vectors of {features.features.path} "
                            f"have D+6 = {features.dim} values (params model.img_feature_dim must equal both)")
