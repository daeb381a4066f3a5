"""Prompt learning (peft): prompt tuning, prefix tuning and P-tuning.

All three leave the backbone untouched and learn "virtual tokens": prompt tuning learns input
embeddings, P-tuning produces them with a small MLP/LSTM, prefix tuning learns keys/values for
every attention layer. None can mix adapters per row (peft prepends one prompt to the batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from adapters.errors import ConfigError
from adapters.methods.base import MethodOptions, ModelInfo, register_method
from adapters.methods.peft_base import PeftMethod


class PromptLearningMethod(PeftMethod):
    """Shared checks and model geometry for the three prompt-learning methods."""

    mixable = False
    # Prompt/P-tuning feed the classifier inputs_embeds; a decoder classifier then cannot find the last
    # real token (it pools the last position, which is padding on right-padded rows).
    needs_input_ids_for_decoder_classifier: ClassVar[bool] = True

    def check_model(self, options, info: ModelInfo, task: str) -> None:
        if info.quantized:
            raise ConfigError(
                f"method {self.name!r} is not supported on a quantized backbone here; "
                "drop model.quantization (prompt learning trains so few weights that a 4-bit base saves little)"
            )
        if task == "sequence-classification" and not info.is_encoder and self.needs_input_ids_for_decoder_classifier:
            raise ConfigError(
                f"method {self.name!r} cannot do sequence-classification on decoder model type {info.model_type!r}: "
                "the classifier pools the last token, which it cannot locate among padded prompt embeddings. "
                f"{self.name!r} supports: causal-lm on any model, sequence-classification on encoders "
                "(BERT family); use prefix-tuning or lora for a decoder classifier"
            )

    def geometry(self, model) -> dict:
        """token_dim / num_layers / num_attention_heads from the backbone config.

        peft reads them from config.to_dict() by a few spellings; attribute access also follows
        transformers' attribute_map (DistilBERT's dim / n_layers / n_heads)."""
        config = model.config
        try:
            return {
                "token_dim": int(config.hidden_size),
                "num_layers": int(config.num_hidden_layers),
                "num_attention_heads": int(config.num_attention_heads),
            }
        except AttributeError as err:
            raise ConfigError(
                f"method {self.name!r}: cannot read the backbone's width/depth/heads from its config ({err})"
            ) from err

    def attach(self, model, options, task, adapter_name="default"):
        try:
            return super().attach(model, options, task, adapter_name)
        except ValueError as err:
            raise ConfigError(f"method {self.name!r} cannot attach to {type(model).__name__}: {err}") from err

    def resumable(self, config) -> bool:
        """Whether the saved file holds the trained parameters themselves (not only their output)."""
        return True

    def load(self, model, folder: Path, adapter_name="default", is_trainable=False):
        if not is_trainable:
            return super().load(model, folder, adapter_name, is_trainable)
        # peft refuses to load prompt learning as trainable; where the saved tensor *is* the trained
        # parameter, build the adapter from the saved config and load the tensor into it.
        from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
        from peft.utils import load_peft_weights

        config = PeftConfig.from_pretrained(str(folder))
        if not self.resumable(config):
            raise ConfigError(
                f"cannot continue training a saved {self.name!r} adapter: peft saves only the virtual tokens its "
                "prompt encoder produced, not the encoder itself; train a new adapter instead of init_from"
            )
        config.inference_mode = False
        if getattr(config, "prompt_tuning_init", None) is not None:
            config.prompt_tuning_init = "RANDOM"  # the saved prompt replaces it; no tokenizer from a foreign path
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, config)
        else:
            model = get_peft_model(model, config, adapter_name=adapter_name)
        set_peft_model_state_dict(model, load_peft_weights(str(folder)), adapter_name=adapter_name)
        return model


# ---------------------------------------------------------------- prompt tuning
class PromptTuningOptions(MethodOptions):
    num_virtual_tokens: int = Field(20, ge=1, description="Number of learned prompt embeddings prepended to the input.")
    init: Literal["random", "text"] = Field(
        "random", description="Start from random vectors, or from the embeddings of init_text's tokens."
    )
    init_text: str | None = Field(
        None,
        validate_default=True,
        description="Text whose token embeddings initialise the prompt (repeated/truncated to num_virtual_tokens).",
    )

    @field_validator("init_text")
    @classmethod
    def _text_init_needs_text(cls, value, info):
        if info.data.get("init") == "text" and not (value or "").strip():
            raise ValueError("init 'text' needs init_text (the words to start the prompt from)")
        return value


def model_folder(model) -> str:
    """The folder the backbone was loaded from (its tokenizer lives there too)."""
    for candidate in (getattr(model.config, "_name_or_path", None), getattr(model, "name_or_path", None)):
        if candidate and Path(candidate).is_dir():
            return str(candidate)
    raise ConfigError(
        "method.init 'text' needs the backbone's tokenizer, but the model was not loaded from a local folder "
        f"(config._name_or_path={getattr(model.config, '_name_or_path', None)!r}); use method.init: random"
    )


class PromptTuningMethod(PromptLearningMethod):
    name = "prompt-tuning"
    summary = "Prompt tuning: learned input embeddings prepended to every input (peft); init from random or text."
    Options = PromptTuningOptions

    def peft_config(self, options: PromptTuningOptions, task, model):
        from peft import PromptTuningConfig, PromptTuningInit

        kwargs = {}
        if options.init == "text":
            kwargs = {
                "prompt_tuning_init": PromptTuningInit.TEXT,
                "prompt_tuning_init_text": options.init_text,
                "tokenizer_name_or_path": model_folder(model),
            }
        return PromptTuningConfig(num_virtual_tokens=options.num_virtual_tokens, **self.geometry(model), **kwargs)


# ---------------------------------------------------------------- prefix tuning
class PrefixTuningOptions(MethodOptions):
    num_virtual_tokens: int = Field(20, ge=1, description="Length of the learned key/value prefix in every attention layer.")
    prefix_projection: bool = Field(
        False, description="Produce the prefix with a 2-layer MLP (more stable training, more parameters while training)."
    )
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="Hidden width of the projection MLP (default: the model's hidden size)."
    )


# Model types whose attention takes no past key/values, so a prefix has nowhere to go.
NO_PAST_KEY_VALUES = {"distilbert"}


def accepts_past_key_values(model) -> bool:
    """Whether the model, or the transformer backbone inside it (peft's fallback), takes past_key_values."""
    import inspect

    candidates = [model] + [child for _, child in model.named_children()]
    return any("past_key_values" in inspect.signature(m.forward).parameters for m in candidates)


class PrefixTuningMethod(PromptLearningMethod):
    name = "prefix-tuning"
    summary = "Prefix tuning: learned keys/values prepended in every attention layer (peft); optional MLP projection."
    Options = PrefixTuningOptions
    needs_input_ids_for_decoder_classifier = False  # the input ids still reach the classifier

    def check_model(self, options, info: ModelInfo, task: str) -> None:
        super().check_model(options, info, task)
        if info.model_type in NO_PAST_KEY_VALUES:
            raise ConfigError(
                f"method 'prefix-tuning' cannot work on model type {info.model_type!r}: its attention takes no "
                "past key/values to hold the prefix. prefix-tuning supports models whose attention accepts "
                "past_key_values (Llama, BERT, RoBERTa, GPT-2, ...); use prompt-tuning or p-tuning here"
            )

    def resumable(self, config) -> bool:
        return not config.prefix_projection  # with the MLP, only its output is saved

    def attach(self, model, options, task, adapter_name="default"):
        if not accepts_past_key_values(model):
            raise ConfigError(
                f"method 'prefix-tuning' cannot attach to {type(model).__name__}: neither it nor its backbone "
                "takes past_key_values; prefix-tuning supports models whose attention accepts them. "
                "Use prompt-tuning or p-tuning"
            )
        return super().attach(model, options, task, adapter_name)

    def peft_config(self, options: PrefixTuningOptions, task, model):
        from peft import PrefixTuningConfig

        geometry = self.geometry(model)
        return PrefixTuningConfig(
            num_virtual_tokens=options.num_virtual_tokens,
            prefix_projection=options.prefix_projection,
            encoder_hidden_size=options.encoder_hidden_size or geometry["token_dim"],
            **geometry,
        )


# ---------------------------------------------------------------- P-tuning
class PTuningOptions(MethodOptions):
    num_virtual_tokens: int = Field(20, ge=1, description="Number of virtual tokens produced by the prompt encoder.")
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field(
        "MLP", description="Prompt encoder: an MLP, or a bidirectional LSTM followed by an MLP."
    )
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="Hidden width of the prompt encoder (default: the model's hidden size)."
    )
    encoder_num_layers: int = Field(2, ge=1, description="LSTM layers (LSTM encoder only).")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the prompt encoder.")


class PTuningMethod(PromptLearningMethod):
    name = "p-tuning"
    summary = "P-tuning: virtual-token embeddings produced by a small MLP/LSTM prompt encoder (peft)."
    Options = PTuningOptions

    def resumable(self, config) -> bool:
        return False  # peft saves the encoder's output tokens, not the MLP/LSTM

    def peft_config(self, options: PTuningOptions, task, model):
        from peft import PromptEncoderConfig

        geometry = self.geometry(model)
        return PromptEncoderConfig(
            num_virtual_tokens=options.num_virtual_tokens,
            encoder_reparameterization_type=options.encoder_reparameterization_type,
            encoder_hidden_size=options.encoder_hidden_size or geometry["token_dim"],
            encoder_num_layers=options.encoder_num_layers,
            encoder_dropout=options.encoder_dropout,
            **geometry,
        )


register_method(PromptTuningMethod())
register_method(PrefixTuningMethod())
register_method(PTuningMethod())
