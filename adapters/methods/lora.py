"""LoRA and its variants (DoRA, rsLoRA), through peft. QLoRA is LoRA on a quantized backbone."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapters.methods.base import MethodOptions, register_method
from adapters.methods.peft_base import PeftMethod

# Per-architecture defaults: every projection of attention and MLP gives the best quality per
# parameter in our runs; users can narrow to "attention" or name modules.
ATTENTION_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],  # bare "c_proj" would also match mlp.c_proj
    "bert": ["query", "key", "value", "attention.output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
}
MLP_MODULES = {
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
MLP_EXCLUDE = {
    "bert": ["attention.output.dense"],
    "roberta": ["attention.output.dense"],
}


def excluded_modules(targets, model) -> list[str] | None:
    """Modules that a target-name suffix would catch but the chosen group does not mean."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if targets == "mlp":
        return MLP_EXCLUDE.get(model_type)
    return None


def resolve_target_modules(targets, model) -> list[str] | str:
    """'attention' | 'mlp' | 'all' | 'all-linear' | an explicit list of module names."""
    if isinstance(targets, list):
        return targets
    if targets == "all-linear":
        return "all-linear"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ATTENTION_MODULES:
        return "all-linear"  # peft finds every linear layer except the output head
    picked = []
    if targets in ("attention", "all"):
        picked += ATTENTION_MODULES[model_type]
    if targets in ("mlp", "all"):
        picked += MLP_MODULES[model_type]
    return picked


class LoraOptions(MethodOptions):
    r: int = Field(8, ge=1, description="Rank of the update matrices.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["attention", "mlp", "all", "all-linear"] | list[str] = Field(
        "all", description="Which linear layers get LoRA: attention, mlp, all (both), all-linear, or a list of names."
    )
    layers: list[int] | None = Field(
        None, description="Only these block indices (e.g. the top ones); backward then stops below the lowest."
    )
    top_layers: int | None = Field(
        None, ge=1, description="Only the top N blocks (shorthand for layers). Cuts backward cost on deep models."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilized scaling alpha/sqrt(r).")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field("default", description="Weight initialisation.")


class LoraMethod(PeftMethod):
    name = "lora"
    summary = "Low-rank updates to chosen linear layers (peft LoRA); DoRA/rsLoRA as options; QLoRA on a 4/8-bit base."
    Options = LoraOptions
    supports_quantized = True
    mixable = True

    def peft_config(self, options: LoraOptions, task, model):
        from peft import LoraConfig

        layers = options.layers
        if options.top_layers is not None:
            n = model.config.num_hidden_layers
            layers = list(range(max(0, n - options.top_layers), n))
        return LoraConfig(
            r=options.r,
            lora_alpha=options.alpha,
            lora_dropout=options.dropout,
            target_modules=resolve_target_modules(options.target_modules, model),
            exclude_modules=excluded_modules(options.target_modules, model),
            layers_to_transform=layers,
            use_dora=options.use_dora or self.force_dora,
            use_rslora=options.use_rslora,
            bias=options.bias,
            init_lora_weights=True if options.init == "default" else options.init,
        )

    force_dora = False


class DoraMethod(LoraMethod):
    name = "dora"
    summary = "Weight-decomposed LoRA: learns magnitude and direction separately (peft use_dora)."
    force_dora = True
    mixable = False  # peft cannot mix DoRA adapters in one batch


register_method(LoraMethod())
register_method(DoraMethod())
