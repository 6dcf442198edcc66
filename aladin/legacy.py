"""Files of the original code: the released ALADIN checkpoint and VinVL's `coco_ir` folder.

These are pickles written by `torch.save`. Since torch 2.6 `torch.load` refuses the argparse Namespace
they hold, and the original's `weights_only=False` would run whatever a pickle names (quirk Q12,
ALADIN.md 9). Here every legacy file goes through `safe_torch_load`: torch's weights-only unpickler
(tensors, storages, containers, numbers, strings) plus an explicit allow-list of globals, and nothing
else: a refused global is never imported or called. A released checkpoint is imported once, strictly,
through an explicit key map (ALADIN.md 10, "Loading the released checkpoints"), and stored in our
safetensors format.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import pickle
import pickletools
import re
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING  # pickle's own Python 2 name map
from pathlib import Path

import torch
from transformers import BertConfig

from .backbone import OscarBackbone, UNUSED_PREFIXES, load_config, load_state_exactly
from .config import CompatConfig, ModelConfig
from .io import PipelineError
from .model import Aladin
from .train import save_model

# The one global a released checkpoint needs beyond tensors: its `opt` entry (ALADIN.md 10, Q12).
CHECKPOINT_GLOBALS = frozenset({"argparse.Namespace"})

# Key prefixes of the released ALADModel (mesnico/ALADIN alad/alad_model.py; ALADIN.md 10).
OSCAR_PREFIX = "img_txt_enc.oscar_model."
HEAD_PREFIX = "img_txt_enc.final_projection_net.layers."
# Linear projections built by the original but never called in forward (ALADIN.md 10).
UNUSED_CHECKPOINT_PREFIXES = ("img_txt_enc.img_proj.", "img_txt_enc.cap_proj.")
# nn.TransformerEncoderLayer's parameter names, unchanged from torch 1.x to 2.x (ALADIN.md 10).
HEAD_LAYER_KEYS = frozenset(
    f"{m}.{p}" for m, p in [("self_attn", "in_proj_weight"), ("self_attn", "in_proj_bias"),
                            ("self_attn.out_proj", "weight"), ("self_attn.out_proj", "bias"),
                            ("linear1", "weight"), ("linear1", "bias"), ("linear2", "weight"),
                            ("linear2", "bias"), ("norm1", "weight"), ("norm1", "bias"),
                            ("norm2", "weight"), ("norm2", "bias")])
# The original fixes nhead=4 for every TE layer (mesnico/ALADIN alad/alad_model.py); the head count is
# the one property of the matching head that its tensors do not reveal.
ORIGINAL_MATCHING_HEADS = 4
# BertConfig fields without which the backbone's shape is unknown (as aladin.backbone.load_config).
BERT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "img_feature_dim")
# Namespace values kept in the returned dict (JSON-safe); objects of other types are dropped.
_PLAIN = (str, int, float, bool, type(None))


# ---------------------------------------------------------------------------------------------------
# Restricted unpickling


def _resolve(name: str):
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"allowed global {name!r} cannot be imported") from None  # a caller's bug


def _refused_in_zip(path: Path, allowed: set[str]) -> list[str]:
    # A static scan of the pickle's opcodes (nothing is imported or called): names every refused global
    # at once, where the unpickler stops at the first.
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return []  # the load below reports what is wrong with the file
    return sorted(set(names) - allowed)


def _legacy_globals(path: Path) -> set[str]:
    """Full names of the GLOBAL opcodes in a legacy (non-zip) torch file, read statically.

    The legacy format is several pickles in a row (magic number, protocol, system info, the object,
    storage keys; torch/serialization.py `_legacy_load`), written with protocol 2, so every global is a
    GLOBAL opcode. Only used to give the unpickler's short name ("eval") its module ("builtins.eval").
    """
    names = set()
    try:
        with path.open("rb") as f:
            for _ in range(5):
                for op, arg, _pos in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        module, name = arg.split(" ", 1)
                        # Protocol 2 writes Python 2 names (__builtin__); pickle maps them back on load.
                        module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
                        names.add(f"{module}.{name}")
    except Exception:
        pass  # raw storage bytes follow the pickles; a scan is best effort
    return names


def safe_torch_load(path, allowed: set[str] | frozenset[str] = frozenset()):
    """Load a `torch.save` file (zip or legacy format) admitting only tensors, plain containers and values,
    and the globals named in `allowed` (e.g. "argparse.Namespace").

    Any other global (`os.system`, `builtins.eval`, a class not allowed) raises `PipelineError` naming the
    file and the global; it is never imported or called.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    allowed = set(allowed)
    admitted = [_resolve(n) for n in sorted(allowed)]
    is_zip = zipfile.is_zipfile(path)
    refused = _refused_in_zip(path, allowed) if is_zip else []
    try:
        if not refused:
            with torch.serialization.safe_globals(admitted):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not found:
            raise PipelineError(f"{path}: not a loadable torch file ({_first_line(e)})") from None
        short = found.group(1)  # torch names a function by its bare name ("eval")
        full = [] if is_zip else sorted(n for n in _legacy_globals(path) - allowed
                                        if n == short or n.endswith("." + short))
        refused = full or [short]
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError) as e:
        raise PipelineError(f"{path}: not a loadable torch file ({e.__class__.__name__}: {_first_line(e)})") from None
    raise PipelineError(f"{path}: refused to unpickle global(s) {', '.join(refused)} "
                        f"(allowed beyond tensors: {', '.join(sorted(allowed)) or 'none'})")


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else e.__class__.__name__


# ---------------------------------------------------------------------------------------------------
# The released checkpoint (`model_best_rsum.pth.tar`)


def _plain(value):
    """JSON-safe copy of a Namespace value; None for anything that is not plain data."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.device):  # `args.device`, set by the original's train.py
        return str(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if all(i is not None or v is None for i, v in zip(items, value)) else None
    return None


def _opt_dict(opt, path: Path) -> dict:
    if opt is None:
        return {}
    if isinstance(opt, dict):
        values = opt
    elif isinstance(opt, argparse.Namespace):
        values = vars(opt)
    else:
        raise PipelineError(f"{path}: key 'opt' is a {type(opt).__name__}, expected an argparse Namespace")
    out = {}
    for key, value in values.items():
        plain = _plain(value)
        if plain is not None or value is None:
            out[str(key)] = plain
    return out


def read_checkpoint(path) -> dict:
    """The checkpoint dict with `opt` turned into a plain dict; the Namespace object is not kept."""
    path = Path(path)
    raw = safe_torch_load(path, CHECKPOINT_GLOBALS)
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a dict with key 'model', got {type(raw).__name__}")
    if "model" not in raw:
        raise PipelineError(f"{path}: missing key 'model' (keys: {', '.join(map(str, raw))})")
    state = raw["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"{path}: key 'model' is not a state dict of tensors")
    config = raw.get("config")
    if config is not None and not isinstance(config, dict):
        raise PipelineError(f"{path}: key 'config' is a {type(config).__name__}, expected a dict")
    return {
        "model": {k.removeprefix("module."): v for k, v in state.items()},
        "opt": _opt_dict(raw.get("opt"), path),
        "config": config,
        "epoch": raw.get("epoch"),
        "Eiters": raw.get("Eiters"),
    }


def _bert_config(ckpt_config: dict | None, backbone_dir, path: Path) -> BertConfig:
    # The released checkpoint's `config` is ALADIN's YAML (model/training sections), which does not
    # describe the backbone; a dict carrying BERT's own fields is used directly.
    if ckpt_config and all(k in ckpt_config for k in BERT_KEYS):
        return BertConfig(**ckpt_config)
    if backbone_dir is None:
        raise PipelineError(f"{path}: key 'config' has no BERT fields ({', '.join(BERT_KEYS)}); "
                            "give the VinVL backbone folder (its config.json)")
    return load_config(backbone_dir)


def _check_aladin_yaml(ckpt_config: dict | None, model_cfg: ModelConfig, hidden: int, path: Path) -> None:
    """Compare the original's YAML `model` section (when present) with our params."""
    model = (ckpt_config or {}).get("model")
    if not isinstance(model, dict) or "tern-layers" not in model:
        return
    if model["tern-layers"] != model_cfg.matching_layers:
        raise PipelineError(f"{path}: config.model.tern-layers = {model['tern-layers']}, but params "
                            f"model.matching_layers = {model_cfg.matching_layers}")
    if "embed-size" in model and model["embed-size"] != hidden:
        raise PipelineError(f"{path}: config.model.embed-size = {model['embed-size']}, but the backbone's "
                            f"hidden_size = {hidden}")
    if model_cfg.matching_heads != ORIGINAL_MATCHING_HEADS:
        raise PipelineError(f"{path}: the original matching head has nhead={ORIGINAL_MATCHING_HEADS} "
                            f"(alad/alad_model.py); params model.matching_heads = {model_cfg.matching_heads}")


def map_checkpoint_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Released names -> our `Aladin` names. Returns (mapped, unexpected original keys); unused keys vanish."""
    mapped, unexpected = {}, []
    for key, tensor in state.items():
        if key.startswith(UNUSED_CHECKPOINT_PREFIXES):
            continue
        if key.startswith(OSCAR_PREFIX):
            oscar = key.removeprefix(OSCAR_PREFIX)
            if oscar.startswith(UNUSED_PREFIXES) or oscar == "bert.embeddings.position_ids":
                continue  # pooler, 2-way classifier; position_ids is a buffer older transformers saved
            if oscar.startswith("bert."):
                mapped["backbone." + oscar.removeprefix("bert.")] = tensor
                continue
        elif key.startswith(HEAD_PREFIX):
            index, _, rest = key.removeprefix(HEAD_PREFIX).partition(".")
            if index.isdigit() and rest in HEAD_LAYER_KEYS:
                mapped[f"matching_head.encoder.layers.{int(index)}.{rest}"] = tensor
                continue
        unexpected.append(key)
    return mapped, unexpected


def _original_name(ours: str) -> str:
    if ours.startswith("backbone."):
        return OSCAR_PREFIX + "bert." + ours.removeprefix("backbone.")
    return HEAD_PREFIX + ours.removeprefix("matching_head.encoder.layers.")


def import_aladin_checkpoint(path, model_cfg: ModelConfig, compat: CompatConfig,
                             backbone_dir=None) -> tuple[Aladin, dict]:
    """Build our `Aladin` from a released `model_best_rsum.pth.tar`, every tensor accounted for.

    `backbone_dir`: a VinVL/Oscar folder whose `config.json` gives the backbone's shape, needed unless the
    checkpoint's `config` carries BERT's fields. Returns the model and the plain values of `opt`.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    return _build_model(ckpt, path, model_cfg, compat, backbone_dir), ckpt["opt"]


def _build_model(ckpt: dict, path: Path, model_cfg: ModelConfig, compat: CompatConfig, backbone_dir) -> Aladin:
    if not compat.first_region_as_cls:
        raise PipelineError(f"{path}: released checkpoints were trained with the first region as the image "
                            "CLS (quirk Q5); set compat.first_region_as_cls: true to import one")
    config = _bert_config(ckpt["config"], backbone_dir, path)
    _check_aladin_yaml(ckpt["config"], model_cfg, config.hidden_size, path)
    model = Aladin(OscarBackbone(config), model_cfg, compat)
    mapped, unexpected = map_checkpoint_keys(ckpt["model"])
    load_state_exactly(model, mapped, unexpected, f"{path}: checkpoint does not match the backbone config and params",
                       name=_original_name)
    return model


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(path, out_dir, model_cfg: ModelConfig, compat: CompatConfig, backbone_dir) -> dict:
    """Import a released checkpoint and write it with `aladin.train.save_model` (safetensors, config.json,
    vocab.txt from `backbone_dir`, training.json). Returns the metadata written."""
    path, backbone_dir = Path(path), Path(backbone_dir)
    if not (backbone_dir / "vocab.txt").is_file():
        raise PipelineError(f"{backbone_dir / 'vocab.txt'}: file not found (the backbone folder gives the vocabulary)")
    ckpt = read_checkpoint(path)
    model = _build_model(ckpt, path, model_cfg, compat, backbone_dir)
    meta = {
        "source": {"file": path.name, "sha256": _sha256(path)},
        "epoch": ckpt["epoch"] if isinstance(ckpt["epoch"], int) else None,
        "Eiters": ckpt["Eiters"] if isinstance(ckpt["Eiters"], int) else None,
        "opt": ckpt["opt"],
        "config": json.loads(json.dumps(ckpt["config"], default=str)) if ckpt["config"] is not None else None,
    }
    save_model(model, out_dir, backbone_dir, meta)
    return meta


# ---------------------------------------------------------------------------------------------------
# VinVL coco_ir files (ALADIN.md 6.2)


def read_captions_pt(path) -> dict[int, list[str]]:
    """`{split}_captions.pt`: image id -> captions; a value may be a JSON-encoded list (decoded here)."""
    path = Path(path)
    raw = safe_torch_load(path)
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a dict image id -> captions, got {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.isdigit())):
            raise PipelineError(f"{path}: key {key!r} is not an integer image id")
        image_id = int(key)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{path}: image {image_id}: captions string is not valid JSON ({e.msg})") from None
        if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
            raise PipelineError(f"{path}: image {image_id}: expected a list of caption strings")
        if image_id in out:
            raise PipelineError(f"{path}: image id {image_id} appears twice")
        out[image_id] = list(value)
    return out
