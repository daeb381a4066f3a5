"""IA3: learned vectors that rescale keys, values and feed-forward activations (peft IA3).

IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", arXiv:2205.05638) multiplies the output of each targeted projection
element-wise by a trained vector l [out] (for a feed-forward projection, its input by l [in]);
the vectors start at one, so a fresh adapter leaves the model unchanged.
"""

from __future__ import annotations

from pydantic import Field

from adapters.errors import ConfigError
from adapters.methods.base import MethodOptions, ModelInfo, register_method
from adapters.methods.peft_base import PeftMethod
from adapters.methods.targets import IA3_TARGETS


class Ia3Options(MethodOptions):
    """Options of ``ia3`` (peft ``IA3Config``)."""

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


def _no_defaults(model_type: str | None) -> str:
    return (
        f"method 'ia3' has no default target modules for model type {model_type!r} "
        f"(it knows: {', '.join(sorted(IA3_TARGETS))}); set method.target_modules"
    )


class Ia3Method(PeftMethod):
    """IA3 (Liu et al. 2022) through peft ``IA3Config``, with per-architecture default targets."""

    name = "ia3"
    summary = "IA3: learned vectors rescale keys, values and feed-forward activations (peft IA3); tiny adapters."
    Options = Ia3Options
    mixable = False  # peft 0.21 ignores per-row adapter_names for IA3 (LoRA-only feature)
    supports_quantized = True  # peft wraps bitsandbytes 4/8-bit layers with its IA3 (tuners/ia3/bnb.py)

    def check_model(self, options: Ia3Options, info: ModelInfo, task: str) -> None:
        """ConfigError without defaults for this architecture, or for feed-forward modules that are not targets."""
        if options.target_modules is None and info.model_type not in IA3_TARGETS:
            raise ConfigError(_no_defaults(info.model_type) + " and method.feedforward_modules")
        if options.target_modules is not None and options.feedforward_modules is not None:
            extra = sorted(set(options.feedforward_modules) - set(options.target_modules))
            if extra:
                raise ConfigError(f"method.feedforward_modules (ia3): {extra} are not in method.target_modules")

    def peft_config(self, options: Ia3Options, task, model):
        """peft ``IA3Config``: explicit targets, else the architecture's defaults (ConfigError if none)."""
        from peft import IA3Config  # peft loads when a model is adapted, not when configs are validated

        model_type = model.config.model_type
        targets, feedforward = IA3_TARGETS.get(model_type, (None, None))
        if options.target_modules is not None:
            targets = list(options.target_modules)
            feedforward = [m for m in (feedforward or []) if m in targets]
        if options.feedforward_modules is not None:
            feedforward = list(options.feedforward_modules)
        if targets is None:
            raise ConfigError(_no_defaults(model_type))
        return IA3Config(target_modules=targets, feedforward_modules=feedforward or [])


register_method(Ia3Method())
