"""IA3: learned vectors that rescale keys, values and feed-forward activations (peft IA3)."""

from __future__ import annotations

from pydantic import Field

from adapters.errors import ConfigError
from adapters.methods.base import MethodOptions, ModelInfo, register_method
from adapters.methods.peft_base import PeftMethod

# (targets, feed-forward subset) per architecture, after the IA3 paper: rescale attention keys
# and values, and the input of the feed-forward output projection. BERT's "output.dense"
# matches both the attention output and the feed-forward output projection (peft's own default).
IA3_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "xlm-roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
}


class Ia3Options(MethodOptions):
    target_modules: list[str] | None = Field(
        None,
        description="Modules whose activations get a learned scale. Default per architecture: "
        "Llama k_proj, v_proj, down_proj; BERT key, value, output.dense.",
    )
    feedforward_modules: list[str] | None = Field(
        None,
        description="Which of target_modules are feed-forward (their input is scaled, not their output). "
        "Default: the architecture's feed-forward output projection, if targeted.",
    )


class Ia3Method(PeftMethod):
    name = "ia3"
    summary = "IA3: learned vectors rescale keys, values and feed-forward activations (peft IA3); tiny adapters."
    Options = Ia3Options
    mixable = False  # peft 0.21 ignores per-row adapter_names for IA3 (LoRA-only feature)
    supports_quantized = True  # peft wraps bitsandbytes 4/8-bit layers with its IA3 (tuners/ia3/bnb.py)

    def check_model(self, options: Ia3Options, info: ModelInfo, task: str) -> None:
        if options.target_modules is None and info.model_type not in IA3_DEFAULTS:
            raise ConfigError(
                f"method 'ia3' has no default target modules for model type {info.model_type!r} "
                f"(it knows: {', '.join(sorted(IA3_DEFAULTS))}); set method.target_modules and "
                "method.feedforward_modules"
            )
        if options.target_modules is not None and options.feedforward_modules is not None:
            extra = sorted(set(options.feedforward_modules) - set(options.target_modules))
            if extra:
                raise ConfigError(f"method.feedforward_modules (ia3): {extra} are not in method.target_modules")

    def peft_config(self, options: Ia3Options, task, model):
        from peft import IA3Config

        model_type = model.config.model_type
        targets, feedforward = IA3_DEFAULTS.get(model_type, (None, None))
        if options.target_modules is not None:
            targets = list(options.target_modules)
            feedforward = [m for m in (feedforward or []) if m in targets]
        if options.feedforward_modules is not None:
            feedforward = list(options.feedforward_modules)
        if targets is None:
            raise ConfigError(
                f"method 'ia3' has no default target modules for model type {model_type!r} "
                f"(it knows: {', '.join(sorted(IA3_DEFAULTS))}); set method.target_modules"
            )
        return IA3Config(target_modules=targets, feedforward_modules=feedforward or [])


register_method(Ia3Method())
