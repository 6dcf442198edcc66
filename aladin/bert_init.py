"""The initial backbone checkpoint the data stage writes (`backbone.init`), always in our Oscar layout.

    random              a seeded BERT of the `backbone` shape over the dataset's words
                        (`aladin.backbone.write_initial_files`)
    vinvl               the VinVL `coco_ir` retrieval checkpoint (ALADIN.md 1.2): `config.json`, `vocab.txt`,
                        `pytorch_model.bin` under Oscar's names, checked with `load_backbone` (every tensor
                        accounted for) and copied; `training_args.bin` is never read (its values: ALADIN.md 6.6)
    bert-base-uncased   the documented fallback when no VinVL checkpoint can be had (ALADIN.md 6.7): a Hugging
                        Face BERT folder (`config.json`, `vocab.txt`, `model.safetensors` or `pytorch_model.bin`;
                        BertModel or BertForPreTraining/BertForMaskedLM names) converted to the Oscar layout.
                        The image input layers it lacks are initialised from the seed as BERT initialises
                        Linear and LayerNorm (normal(0, initializer_range) weight, zero bias; ones, zeros).
The source folder is `backbone.path` when set, else the `downloads` catalogue's files (aladin.download).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertConfig

from .backbone import (OscarBackbone, load_backbone, load_config, load_state_exactly, load_tokenizer,
                       read_state_dict, weights_file, write_initial_files)
from .config import BackboneConfig, DownloadsConfig
from .download import fetch_param, param_folder
from .io import PipelineError, read_json

CATALOGUE = {  # backbone.init -> its files in the downloads catalogue (each group shares one folder)
    "vinvl": ("vinvl_backbone_config", "vinvl_backbone_vocab", "vinvl_backbone_weights"),
    "bert-base-uncased": ("bert_config", "bert_vocab", "bert_weights"),
}
# Keys of a Hugging Face BERT checkpoint that the backbone does not use: the pre-training heads (masked-LM
# and next-sentence), the pooler (ALADIN discards its output, ALADIN.md 1.2), a saved position-id buffer.
BERT_UNUSED_PREFIXES = ("cls.", "pooler.")
BERT_UNUSED_KEYS = ("embeddings.position_ids",)
# config.json entries that describe the file, not the model.
CONFIG_META_KEYS = ("architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
                    "gradient_checkpointing")
BERT_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "max_position_embeddings", "type_vocab_size")


def source_folder(cfg: BackboneConfig, downloads: DownloadsConfig, **download_kwargs) -> Path | None:
    """The folder to initialise from: `backbone.path`, else the fetched catalogue files; None for random."""
    if cfg.init == "random":
        if cfg.path:
            raise PipelineError(f"backbone.path is {cfg.path!r} but backbone.init is random, which reads no folder; "
                                "empty backbone.path or set backbone.init to vinvl or bert-base-uncased")
        return None
    if cfg.init not in CATALOGUE:
        raise PipelineError(f"backbone.init {cfg.init!r} is not one of random, {', '.join(CATALOGUE)}")
    if cfg.path:
        folder = Path(cfg.path)
        if not folder.is_dir():
            raise PipelineError(f"backbone.path {cfg.path!r}: not a folder (expected a {cfg.init} checkpoint folder)")
        return folder
    for key in CATALOGUE[cfg.init]:
        fetch_param(downloads, key, **download_kwargs)
    return param_folder(downloads, CATALOGUE[cfg.init][0])


def write_backbone_files(folder: Path, cfg: BackboneConfig, source: Path | None, img_feature_dim: int, seed: int,
                         words=()) -> str:
    """Write the initial backbone into the existing empty `folder`; returns a short description.

    `words` (random only): every word captions and tags can hold.
    """
    if cfg.init == "random":
        write_initial_files(folder, words, cfg, img_feature_dim, seed)
        return f"random {cfg.num_hidden_layers}-layer BERT (hidden {cfg.hidden_size})"
    if cfg.init == "vinvl":
        return install_vinvl(source, folder, img_feature_dim)
    return convert_bert(source, folder, cfg, img_feature_dim, seed)


# ---------------------------------------------------------------------------------------------------
# VinVL coco_ir


def install_vinvl(src: Path, folder: Path, img_feature_dim: int) -> str:
    """Check the VinVL checkpoint folder `src` and copy its config.json, vocab.txt and weights to `folder`."""
    src = Path(src)
    config = load_config(src)
    if config.img_feature_dim != img_feature_dim:
        raise PipelineError(f"{src / 'config.json'}: img_feature_dim is {config.img_feature_dim}, but params "
                            f"model.img_feature_dim is {img_feature_dim} (the region vectors' length)")
    load_backbone(src)  # every tensor accounted for, or a PipelineError listing the leftovers
    load_tokenizer(src)
    weights = weights_file(src)
    for path in (src / "config.json", src / "vocab.txt", weights):
        shutil.copyfile(path, folder / path.name)
    return f"VinVL checkpoint from {src} ({config.num_hidden_layers} layers, hidden {config.hidden_size})"


# ---------------------------------------------------------------------------------------------------
# bert-base-uncased


def map_bert_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Hugging Face BERT names -> our backbone's names (Oscar's without `bert.`).

    Accepts BertModel names (`embeddings.*`) and BertFor* names (`bert.embeddings.*`), and the original
    release's LayerNorm `gamma`/`beta`. Returns (mapped, unused source keys, unexpected source keys).
    """
    mapped, unused, unexpected = {}, [], []
    for key, tensor in state.items():
        name = key.removeprefix("module.")
        if name.startswith("cls."):
            unused.append(key)
            continue
        name = name.removeprefix("bert.")
        if name.startswith(BERT_UNUSED_PREFIXES) or name in BERT_UNUSED_KEYS:
            unused.append(key)
            continue
        if name.startswith(("embeddings.", "encoder.")):
            name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))
            mapped[name] = tensor
        else:
            unexpected.append(key)  # e.g. image layers: a VinVL folder given as bert-base-uncased
    return mapped, unused, unexpected


def bert_to_oscar_config(raw: dict, path: Path, cfg: BackboneConfig, img_feature_dim: int) -> BertConfig:
    """The Oscar config: BERT's own fields plus the image-input fields Oscar's BertImgModel reads."""
    for key in BERT_SHAPE_KEYS:
        if key not in raw:
            raise PipelineError(f"{path}: missing key '{key}'")
    if "img_feature_dim" in raw:
        raise PipelineError(f"{path}: has img_feature_dim, so this is an Oscar/VinVL checkpoint, not a plain BERT; "
                            "use backbone.init: vinvl for it")
    kept = {k: v for k, v in raw.items() if k not in CONFIG_META_KEYS}
    return BertConfig(**kept, img_feature_dim=img_feature_dim, img_feature_type="frcnn",
                      use_img_layernorm=int(cfg.use_img_layernorm), img_layer_norm_eps=cfg.img_layer_norm_eps)


def convert_bert(src: Path, folder: Path, cfg: BackboneConfig, img_feature_dim: int, seed: int) -> str:
    """Convert the Hugging Face BERT folder `src` into an Oscar-layout checkpoint in `folder`."""
    src = Path(src)
    raw = read_json(src / "config.json")
    if not isinstance(raw, dict):
        raise PipelineError(f"{src / 'config.json'}: expected a JSON object")
    config = bert_to_oscar_config(raw, src / "config.json", cfg, img_feature_dim)
    tokenizer = load_tokenizer(src)
    if len(tokenizer.vocab) > config.vocab_size:
        raise PipelineError(f"{src / 'vocab.txt'}: {len(tokenizer.vocab)} tokens, more than the config's "
                            f"vocab_size {config.vocab_size}")
    weights = weights_file(src)
    state = read_state_dict(src)
    mapped, unused, unexpected = map_bert_keys(state)
    model = OscarBackbone(config)
    # The image input layers BERT lacks: BERT's initialiser, drawn from our generator so that the bytes
    # depend only on the seed (as aladin.backbone.write_initial_checkpoint).
    generator = torch.Generator().manual_seed(seed)
    h, std = config.hidden_size, config.initializer_range
    mapped["img_embedding.weight"] = torch.randn(h, img_feature_dim, generator=generator) * std  # (H, F)
    mapped["img_embedding.bias"] = torch.zeros(h)
    if model.LayerNorm is not None:
        mapped["LayerNorm.weight"], mapped["LayerNorm.bias"] = torch.ones(h), torch.zeros(h)
    prefix = "bert." if any(k.removeprefix("module.").startswith("bert.") for k in state) else ""
    load_state_exactly(model, mapped, unexpected, f"{weights}: not a BERT checkpoint matching {src / 'config.json'}",
                       name=lambda k: prefix + k)
    out_state = {f"bert.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    (folder / "config.json").write_text(config.to_json_string(use_diff=False))
    shutil.copyfile(src / "vocab.txt", folder / "vocab.txt")
    save_file(out_state, folder / "model.safetensors", metadata={"format": "pt"})
    heads = sorted({_head(k) for k in unused})
    note = f"; unused: {', '.join(heads)}" if heads else ""
    return f"bert-base-uncased from {src} ({config.num_hidden_layers} layers, hidden {h}; image layers from seed {seed}{note})"


def _head(key: str) -> str:
    """"cls.predictions.transform.dense.weight" -> "cls.predictions"; "bert.pooler.dense.bias" -> "pooler"."""
    parts = key.removeprefix("module.").removeprefix("bert.").split(".")
    return ".".join(parts[:2]) if parts[0] == "cls" else parts[0]
