"""The Oscar/VinVL backbone ("BertImgModel") on Hugging Face BERT modules, and its checkpoint folders.

ALADIN runs the VinVL retrieval checkpoint as a dual encoder: the same weights encode a caption alone and
an image (object-tag text followed by region vectors) alone (ALADIN.md 1.2-1.3). Region tokens get
Linear(img_feature_dim -> H) -> LayerNorm (if `use_img_layernorm`) -> dropout and NO position or
token-type embedding, which is why a plain `BertModel(inputs_embeds=...)` cannot be used (ALADIN.md 10).

A checkpoint folder has the VinVL/Oscar layout: `config.json`, `vocab.txt` and `pytorch_model.bin`
(or `model.safetensors`) under Oscar's parameter names (`bert.embeddings.*`, `bert.encoder.layer.*`,
`bert.img_embedding.*`, `bert.LayerNorm.*`; `bert.pooler.*` and `classifier.*` exist but are unused).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn
from transformers import BertConfig, BertTokenizer
from transformers.models.bert.modeling_bert import BertEmbeddings, BertEncoder

from .config import BackboneConfig
from .io import PipelineError, atomic_path

# Oscar adds -10000 at masked positions (microsoft/Oscar oscar/modeling/modeling_bert.py); in fp32 this and
# the dtype minimum both give zero attention weight.
MASK_VALUE = -10000.0

# Checkpoint keys that exist in VinVL coco_ir checkpoints but that ALADIN never uses (ALADIN.md 1.3).
UNUSED_PREFIXES = ("bert.pooler.", "classifier.")
# BERT's special-token layout: [PAD]=0, [unused*]=1..99, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103.
SPECIAL_TOKENS = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class OscarBackbone(nn.Module):
    """BERT encoder with Oscar's image-token path. Parameter names equal Oscar's minus the `bert.` prefix."""

    def __init__(self, config: BertConfig):
        super().__init__()
        config._attn_implementation = "eager"  # additive mask exactly as Oscar; no attention outputs
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.img_embedding = nn.Linear(config.img_feature_dim, config.hidden_size)
        # Oscar creates the image LayerNorm only when the config has a truthy `use_img_layernorm`.
        self.LayerNorm = (
            nn.LayerNorm(config.hidden_size, eps=config.img_layer_norm_eps)
            if getattr(config, "use_img_layernorm", False) else None
        )
        self.img_dropout = nn.Dropout(config.hidden_dropout_prob)

    def _encode(self, embeddings: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        additive = (1.0 - keep[:, None, None, :].to(embeddings.dtype)) * MASK_VALUE  # (B, 1, 1, L)
        return self.encoder(embeddings, attention_mask=additive).last_hidden_state

    def forward_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Caption pass: ids (B, L), mask (B, L) with 1 = keep -> last-layer tokens (B, L, H)."""
        token_type_ids = torch.zeros_like(input_ids)
        return self._encode(self.embeddings(input_ids, token_type_ids), attention_mask)

    def forward_image(self, input_ids, token_type_ids, attention_mask, img_feats) -> torch.Tensor:
        """Image pass: tag ids (B, Lt), types (B, Lt), mask (B, Lt + R), regions (B, R, F) -> (B, Lt + R, H)."""
        text = self.embeddings(input_ids, token_type_ids)  # (B, Lt, H)
        regions = self.img_embedding(img_feats)  # (B, R, H)
        if self.LayerNorm is not None:
            regions = self.LayerNorm(regions)
        regions = self.img_dropout(regions)
        return self._encode(torch.cat([text, regions], dim=1), attention_mask)


# ---------------------------------------------------------------------------------------------------
# Checkpoint folders


def bert_config(cfg: BackboneConfig, vocab_size: int, img_feature_dim: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        type_vocab_size=2,
        img_feature_dim=img_feature_dim,
        img_feature_type="frcnn",
        use_img_layernorm=int(cfg.use_img_layernorm),
        img_layer_norm_eps=cfg.img_layer_norm_eps,
        num_labels=2,
    )


def _init_weights(module: nn.Module, std: float, generator: torch.Generator) -> None:
    # BERT's initialiser (normal(0, 0.02) weights, zero biases, unit LayerNorm), drawn from our generator
    # so the checkpoint's bytes depend only on the seed.
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def write_initial_checkpoint(out_dir, words, cfg: BackboneConfig, img_feature_dim: int, seed: int) -> None:
    """Write a randomly initialised backbone in the VinVL/Oscar folder layout.

    `words`: every word the captions and tags can contain; the vocabulary is BERT's special-token block
    followed by the lower-cased words, so [UNK] keeps id 100 as in bert-base-uncased (quirk Q1).
    """
    with atomic_path(out_dir, directory=True) as tmp:
        write_initial_files(tmp, words, cfg, img_feature_dim, seed)


def write_initial_files(folder: Path, words, cfg: BackboneConfig, img_feature_dim: int, seed: int) -> None:
    """`write_initial_checkpoint` into the existing folder `folder`, not atomically."""
    vocab = list(SPECIAL_TOKENS)
    seen = set(vocab)
    for w in sorted({w.lower() for w in words} | set(".,")):
        if w not in seen:
            vocab.append(w)
            seen.add(w)
    config = bert_config(cfg, len(vocab), img_feature_dim)
    generator = torch.Generator().manual_seed(seed)
    model = OscarBackbone(config)
    _init_weights(model, config.initializer_range, generator)
    state = {f"bert.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    # The unused pooler and 2-way classifier of ImageBertForSequenceClassification, so that this folder
    # exercises the same loader as a real VinVL checkpoint.
    h = config.hidden_size
    state["bert.pooler.dense.weight"] = torch.randn(h, h, generator=generator) * config.initializer_range
    state["bert.pooler.dense.bias"] = torch.zeros(h)
    state["classifier.weight"] = torch.randn(2, h, generator=generator) * config.initializer_range
    state["classifier.bias"] = torch.zeros(2)
    (folder / "config.json").write_text(config.to_json_string(use_diff=False))
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab))
    torch.save(state, folder / "pytorch_model.bin")


def load_tokenizer(checkpoint_dir) -> BertTokenizer:
    """The checkpoint's lower-casing BERT wordpiece tokenizer."""
    vocab_file = Path(checkpoint_dir) / "vocab.txt"
    if not vocab_file.is_file():
        raise PipelineError(f"{vocab_file}: file not found (a backbone folder needs vocab.txt)")
    return BertTokenizer(vocab=str(vocab_file), do_lower_case=True)


def load_config(checkpoint_dir) -> BertConfig:
    path = Path(checkpoint_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (a backbone folder needs config.json)") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "img_feature_dim"):
        if key not in raw:
            raise PipelineError(f"{path}: missing key '{key}'")
    return BertConfig(**raw)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the first present is read


def weights_file(checkpoint_dir) -> Path:
    """The weights file `read_state_dict` reads: model.safetensors, else pytorch_model.bin."""
    folder = Path(checkpoint_dir)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise PipelineError(f"{folder}: no model.safetensors or pytorch_model.bin")


def read_state_dict(checkpoint_dir) -> dict[str, torch.Tensor]:
    """Tensors of `model.safetensors` or `pytorch_model.bin`, never unpickling arbitrary objects."""
    path = weights_file(checkpoint_dir)
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(path)
        except Exception as e:  # safetensors raises its own SafetensorError for a damaged header
            raise PipelineError(f"{path}: cannot be read as safetensors ({e.__class__.__name__}: {e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError with its own wording
        raise PipelineError(f"{path}: cannot be read as a plain tensor checkpoint ({e.__class__.__name__})") from None
    if not isinstance(state, dict):
        raise PipelineError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _listed(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_state_exactly(model: nn.Module, mapped: dict, unexpected: list[str], context: str,
                       name=lambda key: key) -> None:
    """Load `mapped` (our key -> tensor) into `model` only if every tensor is accounted for.

    `unexpected`: checkpoint keys the caller's key map could not place. Missing, unexpected and mis-shaped
    keys are all listed in one PipelineError, `context` first; `name` turns our key into the checkpoint's.
    """
    expected = model.state_dict()
    missing = [name(k) for k in expected if k not in mapped]
    unexpected = list(unexpected) + [name(k) for k in mapped if k not in expected]
    wrong = [f"{name(k)} {tuple(v.shape)} != {tuple(expected[k].shape)}"
             for k, v in mapped.items() if k in expected and v.shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(sorted(unexpected))}")
    if wrong:
        problems.append(f"wrong shapes: {_listed(wrong)}")
    if problems:
        raise PipelineError(f"{context}; " + "; ".join(problems))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in mapped.items()}, strict=True)


def load_backbone(checkpoint_dir) -> OscarBackbone:
    """Build the backbone from `config.json` and load every tensor strictly through the Oscar key map."""
    config = load_config(checkpoint_dir)
    model = OscarBackbone(config)
    state = {k.removeprefix("module."): v for k, v in read_state_dict(checkpoint_dir).items()}
    expected = model.state_dict()
    mapped, unexpected = {}, []
    for key, tensor in state.items():
        if key.startswith(UNUSED_PREFIXES) or key == "bert.embeddings.position_ids":
            continue
        ours = key.removeprefix("bert.")
        if key.startswith("bert.") and ours in expected:
            mapped[ours] = tensor
        else:
            unexpected.append(key)
    load_state_exactly(model, mapped, unexpected, f"{checkpoint_dir}: checkpoint does not match config.json",
                       name=lambda k: f"bert.{k}")
    return model
