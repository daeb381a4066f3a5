"""Where each method attaches, per architecture: the module-name tables every method shares.

Names are module-name suffixes as peft matches them (``"q_proj"`` matches
``model.layers.3.self_attn.q_proj``), keyed by ``config.model_type``. Kept free of torch and peft
so that config validation and ``--list-methods`` can read them.
"""

from __future__ import annotations

from typing import Any

# LoRA-family target groups. Every projection of attention and MLP gives the best quality per
# parameter in our runs; users can narrow to "attention" or name modules.
ATTENTION_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],  # bare "c_proj" would also match mlp.c_proj
    "bert": ["query", "key", "value", "attention.output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
}
MLP_MODULES: dict[str, list[str]] = {
    "llama": ["gate_proj", "up_proj", "down_proj"],
    "mistral": ["gate_proj", "up_proj", "down_proj"],
    "qwen2": ["gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_fc", "mlp.c_proj"],
    "bert": ["intermediate.dense", "output.dense"],
    "roberta": ["intermediate.dense", "output.dense"],
    "distilbert": ["lin1", "lin2"],
}
# peft matches target names by suffix: BERT's feed-forward output "output.dense" also matches the
# attention output "attention.output.dense", which "mlp" must leave out.
MLP_EXCLUDE: dict[str, list[str]] = {
    "bert": ["attention.output.dense"],
    "roberta": ["attention.output.dense"],
}

# IA3 (targets, feed-forward subset), after Liu et al. 2022: rescale attention keys and values,
# and the input of the feed-forward output projection. BERT's "output.dense" matches both the
# attention output and the feed-forward output projection (peft's own default).
IA3_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "xlm-roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
}

# Bottleneck adapters: (block list, attention output projection, feed-forward output projection),
# the last two relative to one block. The adapter rewrites the output of these projections.
BOTTLENECK_TARGETS: dict[str, tuple[str, str, str]] = {
    "llama": ("layers", "self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("layers", "self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("layers", "self_attn.o_proj", "mlp.down_proj"),
    "bert": ("layer", "attention.output.dense", "output.dense"),
    "roberta": ("layer", "attention.output.dense", "output.dense"),
    "xlm-roberta": ("layer", "attention.output.dense", "output.dense"),
    "electra": ("layer", "attention.output.dense", "output.dense"),
    "distilbert": ("layer", "attention.out_lin", "ffn.lin2"),
}
BOTTLENECK_MODEL_TYPES: tuple[str, ...] = tuple(sorted(BOTTLENECK_TARGETS))

# Classification heads a new task trains from scratch (transformers' names: BERT "classifier",
# decoders "score"); a model may name its own in ``adapterkit_head_names``.
HEAD_MODULES = ("classifier", "score")

# Final norms of decoders sit between the last block and the head: they belong to the "top".
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "norm_f", "final_layernorm")


def model_type_of(model: Any) -> str | None:
    """``model.config.model_type`` ("llama", "bert", ...), or None for a model without a config."""
    return getattr(getattr(model, "config", None), "model_type", None)


#: What the LoRA-family target groups mean on an architecture without a table above (printed by
#: ``--list-methods``, said in docs/methods.md).
TARGET_FALLBACK_NOTE = (
    "target_modules attention/mlp/all on a model type without a table ("
    + ", ".join(sorted(ATTENTION_MODULES))
    + " have one): every linear layer inside the numbered blocks, never the output head (lm_head) or a class head"
)


def resolve_target_modules(targets: str | list[str], model: Any) -> list[str] | str:
    """Module-name suffixes for a LoRA-family target group on `model`.

    targets: "attention" | "mlp" | "all" (both) | "all-linear" | an explicit list of names (returned as is).
    Returns a list of suffixes; "all-linear" (peft then adapts every linear layer except the output
    head) for "all-linear". On a model type missing from ``ATTENTION_MODULES`` every group falls back
    to block_linear_modules (TARGET_FALLBACK_NOTE), or "all-linear" for a model without numbered blocks.
    """
    if isinstance(targets, list):
        return targets
    if targets == "all-linear":
        return "all-linear"
    model_type = model_type_of(model)
    if model_type not in ATTENTION_MODULES:
        return block_linear_modules(model) or "all-linear"
    picked = []
    if targets in ("attention", "all"):
        picked += ATTENTION_MODULES[model_type]
    if targets in ("mlp", "all"):
        picked += MLP_MODULES[model_type]
    return picked


def block_linear_modules(model: Any) -> list[str]:
    """The linear layers inside `model`'s numbered blocks, as names relative to a block (e.g.
    ``self_attn.q_proj`` for ``model.layers.3.self_attn.q_proj``), in module order; empty for a model
    without numbered blocks. Heads (``lm_head``, HEAD_MODULES) are never included.

    Relative names rather than leaf names: a linear layer outside the blocks that shares a leaf name
    does not match them (peft matches target names as suffixes), and peft's layers_to_transform still
    applies (it needs a list, not a regex).
    """
    # Only called with a loaded model, so torch and transformers are already imported.
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    heads = set(head_module_names(model)) | {"lm_head"}
    found: dict[str, None] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if parts[0] in heads or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is not None and index + 1 < len(parts):
            found[".".join(parts[index + 1 :])] = None
    return list(found)


def excluded_modules(targets: str | list[str], model: Any) -> list[str] | None:
    """Modules that a target-name suffix of `targets` would catch but the group does not mean (peft
    ``exclude_modules``); None when nothing needs excluding."""
    if targets == "mlp":
        return MLP_EXCLUDE.get(model_type_of(model))
    return None


def head_module_names(model: Any) -> list[str]:
    """Names of the classification head modules of `model` that must stay trainable (and be saved)."""
    names = getattr(model, "adapterkit_head_names", None)
    if names:
        return list(names)
    return [n for n in HEAD_MODULES if hasattr(model, n)]


def chosen_layers(layers: list[int] | None, top_layers: int | None, model: Any) -> list[int] | None:
    """Block indices a method adapts: `layers` as given, or the top `top_layers` of
    ``model.config.num_hidden_layers`` blocks; None means every block."""
    if top_layers is None:
        return layers
    n = model.config.num_hidden_layers
    return list(range(max(0, n - top_layers), n))
