"""Loading a backbone (optionally 4/8-bit) and its tokenizer for a task.

bitsandbytes is imported only where quantization is asked for: it is optional on some machines,
and its absence must become a ConfigError, not an import error of this module.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
from peft import prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)

from adapters.config import ModelConfig, QuantizationConfig
from adapters.data.chat import name_model
from adapters.distributed import zero3_enabled
from adapters.errors import ConfigError
from adapters.gguf_meta import converted_source
from adapters.methods.base import ModelInfo
from adapters.modeling.builtins import BUILTIN_MODELS, resolve_model
from adapters.modeling.mean_pooling import MeanPoolingForSequenceClassification

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_info(model_cfg: ModelConfig) -> ModelInfo:
    """Read what validation needs from the backbone's config.json alone (no weights).

    is_encoder: a bidirectional encoder type (BERT family), not a decoder.
    """
    config = AutoConfig.from_pretrained(resolve_model(model_cfg.name), revision=model_cfg.revision)
    return ModelInfo(
        model_type=config.model_type,
        is_encoder=not bool(getattr(config, "is_decoder", False)) and config.model_type in _ENCODER_TYPES,
        num_layers=int(getattr(config, "num_hidden_layers", 0) or 0),
        hidden_size=int(getattr(config, "hidden_size", 0) or 0),
        quantized=model_cfg.quantization is not None,
    )


_ENCODER_TYPES = {
    "bert",
    "roberta",
    "distilbert",
    "deberta",
    "deberta-v2",
    "electra",
    "xlm-roberta",
    "albert",
    "mpnet",
    "modernbert",
}


def load_tokenizer(model_cfg: ModelConfig):
    """The backbone's tokenizer; a decoder without a pad token pads with EOS. A GGUF backbone's
    tokenizer and chat template come from the GGUF's metadata (its converted folder)."""
    path = resolve_model(model_cfg.name)
    tok = AutoTokenizer.from_pretrained(path, revision=model_cfg.revision)
    name_model(tok, model_cfg.name)  # data messages name the model as written, not its cache folder
    if tok.pad_token is None:
        # Decoders often ship without a pad token; EOS is safe because padded labels are -100.
        tok.pad_token = tok.eos_token
    _note_missing_chat_template(path, tok)
    return tok


_noted_plain_format: set[str] = set()


def _note_missing_chat_template(path: str, tok) -> None:
    """Say once per process and GGUF that it carries no chat template: causal-lm prompts then take
    the plain format (adapters.data.prompts), which the user may not expect from a chat model."""
    source = converted_source(path)
    if source is None or getattr(tok, "chat_template", None) or path in _noted_plain_format:
        return
    _noted_plain_format.add(path)
    log.warning(
        "%s carries no chat template: causal-lm prompts use the plain format ('<instruction>\\n<input>\\nAnswer:')",
        source.get("source", path),
    )


def resolve_pooling(model_cfg: ModelConfig, path: str) -> str:
    """ "cls" | "mean" | "last" as configured; for "auto": the built-in's pooling, "mean" for a
    sentence-transformers folder that mean-pools, else "auto" (the architecture's own head)."""
    if model_cfg.pooling != "auto":
        return model_cfg.pooling
    if model_cfg.name in BUILTIN_MODELS:
        return BUILTIN_MODELS[model_cfg.name].pooling
    pooling_cfg = Path(path) / "1_Pooling" / "config.json"  # sentence-transformers layout
    if pooling_cfg.is_file() and json.loads(pooling_cfg.read_text()).get("pooling_mode_mean_tokens"):
        return "mean"
    return "auto"


def quantization_config(model_cfg: ModelConfig) -> BitsAndBytesConfig | None:
    """transformers' BitsAndBytesConfig for ``model.quantization`` (None when not quantized).

    Raises ConfigError when bitsandbytes cannot be imported or cannot run on this device.
    """
    q = model_cfg.quantization
    if q is None:
        return None
    try:
        import bitsandbytes  # noqa: F401  (optional: see the module docstring)
    except Exception as err:  # pragma: no cover - depends on the install
        raise ConfigError(
            f"model.quantization needs bitsandbytes, which cannot be imported here ({err}); "
            "install it or drop model.quantization"
        ) from err
    _probe_bitsandbytes(q)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        # DeepSpeed ZeRO-3 needs the packed storage dtype to match the compute dtype.
        bnb_4bit_quant_storage=DTYPES[q.compute_dtype],
    )


def _probe_bitsandbytes(q: QuantizationConfig) -> None:
    """Quantize one small block on the device the model will use. A bitsandbytes build without a
    backend for this device then fails here with a clear message instead of deep inside loading."""
    # Optional dependency (see the module docstring); quantization_config has checked it imports.
    import bitsandbytes
    import bitsandbytes.functional as bnbf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        block = torch.zeros(64, 64, device=device)
        if q.bits == 4:
            bnbf.quantize_4bit(block, quant_type=q.quant_type)
        else:
            bnbf.int8_vectorwise_quant(block.to(torch.float16))
    except Exception as err:
        raise ConfigError(
            f"model.quantization: bitsandbytes {getattr(bitsandbytes, '__version__', '?')} cannot run "
            f"{q.bits}-bit on {device} here ({type(err).__name__}: {err}); "
            "drop model.quantization or install a bitsandbytes build for this device"
        ) from err


def load_backbone(model_cfg: ModelConfig, task: str, label2id: dict[str, int] | None = None, device_map=None):
    """Load the model for `task`: a causal LM, or a classifier with a fresh head for `label2id`.

    label2id: class name -> class id (classification only; the head gets one row per class).
    device_map: passed to from_pretrained (a quantized model defaults to GPU 0, or the CPU).
    Raises ConfigError for weights that cannot be loaded or impossible combinations.
    """
    path = resolve_model(model_cfg.name)
    kwargs = {"revision": model_cfg.revision}
    dtype = DTYPES.get(model_cfg.dtype, "auto") if model_cfg.dtype != "auto" else "auto"
    kwargs["dtype"] = dtype
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if model_cfg.init == "random" and model_cfg.quantization is not None:
        raise ConfigError(
            "model.init: 'random' cannot be combined with model.quantization (quantize a trained model instead)"
        )
    qcfg = quantization_config(model_cfg)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        if not zero3_enabled():  # ZeRO-3 places its sharded weights itself and refuses a device_map
            kwargs["device_map"] = device_map or ({"": 0} if torch.cuda.is_available() else "cpu")
        if model_cfg.quantization.compute_dtype != "float32" or model_cfg.dtype == "float32":
            kwargs["dtype"] = DTYPES[model_cfg.quantization.compute_dtype]
    elif device_map is not None:
        kwargs["device_map"] = device_map

    try:
        if task == "causal-lm":
            model = _load_weights(AutoModelForCausalLM, path, model_cfg, kwargs)
        else:
            if not label2id:
                raise ConfigError("sequence-classification needs labels; the training data has none")
            id2label = {i: label for label, i in label2id.items()}
            if resolve_pooling(model_cfg, path) == "mean":
                no_pooler = {**kwargs, "add_pooling_layer": False} if _has_pooler(path) else kwargs
                backbone = _load_weights(AutoModel, path, model_cfg, no_pooler)
                model = MeanPoolingClassifier(backbone, label2id, id2label)
            else:
                model = _load_weights(
                    AutoModelForSequenceClassification,
                    path,
                    model_cfg,
                    kwargs,
                    config_kwargs={"num_labels": len(label2id), "label2id": label2id, "id2label": id2label},
                )
                if model.config.pad_token_id is None:
                    # Decoder classifiers find the last real token through pad_token_id.
                    tok = AutoTokenizer.from_pretrained(path)
                    model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    except OSError as err:
        raise ConfigError(f"model.name {model_cfg.name!r}: cannot load ({err})") from err

    if qcfg is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_cfg.gradient_checkpointing)
        allow_cpu_4bit_packing(model, False)
    elif model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model


def allow_cpu_4bit_packing(model: nn.Module, allowed: bool) -> int:
    """Let bitsandbytes repack 4-bit weights for its fast CPU inference kernel, or not.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight on its first forward in eval
    mode without grad, for good; its packed kernel has no backward, so every later training step
    silently loses the gradient through the frozen 4-bit layers (QLoRA with periodic evaluation).
    load_backbone turns packing off; an inference-only engine turns it back on (bitsandbytes'
    own choice for this CPU). Returns how many layers were set.
    """
    try:
        import bitsandbytes as bnb  # optional (see the module docstring): no 4-bit layers without it
    except Exception:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            if not hasattr(module, "bnb_cpu_packing_default"):
                module.bnb_cpu_packing_default = bool(module.support_avx512bf16_for_cpu)
            module.support_avx512bf16_for_cpu = module.bnb_cpu_packing_default and allowed
            count += 1
    return count


def _load_weights(auto_cls, path: str, model_cfg: ModelConfig, kwargs: dict, config_kwargs: dict | None = None):
    """from_pretrained, or for model.init=random the same architecture with fresh weights (from-scratch baseline)."""
    config_kwargs = {**_dropout_overrides(path, model_cfg), **(config_kwargs or {})}
    if model_cfg.init == "pretrained":
        return auto_cls.from_pretrained(path, **config_kwargs, **kwargs)
    kwargs = dict(kwargs)
    config = AutoConfig.from_pretrained(path, revision=kwargs.pop("revision", None), **config_kwargs)
    kwargs.pop("device_map", None)
    if kwargs.get("dtype") == "auto":
        kwargs.pop("dtype")
    return auto_cls.from_config(config, **kwargs)


# The names architectures use for their dropout probabilities (BERT, Llama, GPT-2, DistilBERT, ...).
_DROPOUT_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "attention_dropout",
    "hidden_dropout",
    "dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "classifier_dropout",
    "seq_classif_dropout",
)


def _dropout_overrides(path: str, model_cfg: ModelConfig) -> dict:
    """model.dropout set: every dropout probability the architecture's config has, set to it."""
    if model_cfg.dropout is None:
        return {}
    config = AutoConfig.from_pretrained(path, revision=model_cfg.revision)
    return {key: model_cfg.dropout for key in _DROPOUT_KEYS if hasattr(config, key)}


def _has_pooler(path: str) -> bool:
    """Whether AutoModel of this architecture builds a pooler (which mean pooling leaves unused)."""
    cfg = AutoConfig.from_pretrained(path)
    return cfg.model_type in ("bert", "roberta", "xlm-roberta", "electra")


class MeanPoolingClassifier(MeanPoolingForSequenceClassification):
    """adapterkit's mean-pooling classifier (adapters.modeling.mean_pooling), built around a loaded encoder
    with a fresh head for `label2id` (class name -> id; `id2label` its inverse).

    Older adapterkit versions named the encoder ``backbone``, so their adapters' keys say ``backbone.``;
    peft maps those to the encoder's standard name on load through ``_checkpoint_conversion_mapping``
    (load_delta does the same for full/partial/head-only). ``backbone`` stays readable as an alias.
    """

    adapterkit_head_names = ("classifier",)

    def __init__(self, backbone: nn.Module, label2id: dict[str, int], id2label: dict[int, str]):
        config = backbone.config
        config.label2id = dict(label2id)
        config.id2label = dict(id2label)
        config.num_labels = len(label2id)
        super().__init__(config, encoder=backbone)
        self._checkpoint_conversion_mapping = legacy_key_mapping(self)

    @property
    def backbone(self) -> nn.Module:
        """The wrapped encoder (its attribute name in older versions)."""
        return self.base_model


def legacy_key_mapping(model: nn.Module) -> dict[str, str]:
    """Regex -> replacement for adapter keys saved when the encoder was named ``backbone``: peft's
    ``key_mapping``; empty for models that never had that name."""
    prefix = getattr(model, "base_model_prefix", "")
    return {r"^backbone\.": f"{prefix}."} if isinstance(model, MeanPoolingClassifier) and prefix else {}
