"""The run config: YAML on disk, pydantic behind it, dotted overrides on the command line.

Every key is validated before any model loads; an unknown key, a wrong type or an
impossible combination raises ConfigError naming the key and the valid choices. This module
and the method registry it imports stay free of peft, transformers and datasets, so that
``train.py --check`` validates a config without loading them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapters.constants import (
    CAUSAL_LM_METRICS,
    CLASSIFICATION_METRICS,
    GENERATION_METRICS,
    PREFERENCE_METRICS,
    Task,
)
from adapters.errors import ConfigError, yaml_problem
from adapters.gguf_meta import check_model_name
from adapters.methods import get_method, list_methods
from adapters.methods.base import MethodOptions, NumbersNotBools
from adapters.paths import read_bounded_text, validate_name

# Upper bounds of sizes the config alone can judge: far above any run this toolkit makes, far below what
# would try to allocate the machine away (method.r = 1e8 asks for ~150 GB) or never end.
MAX_STEPS = 10**9
MAX_EPOCHS = 10**6
MAX_BATCH = 2**16
MAX_TOKENS = 2**20  # data.max_length, generation budgets: 1M tokens, beyond any context window here
MAX_LR = 10.0  # AdamW moves each weight by about lr per step: beyond ~1 every run diverges
#: method option -> largest value (the rank of a low-rank update, or learned prompt length, past 4096 is
#: larger than the layers of any model this toolkit trains; the preflight also checks r against the layers).
METHOD_OPTION_LIMITS = {
    "r": 4096,
    "num_virtual_tokens": 4096,
    "encoder_hidden_size": 65536,
    "encoder_num_layers": 64,
    "top_layers": 4096,
    "blocks": 4096,
}
#: Largest config file read (bytes) and most YAML nodes it may expand to, aliases counted at every use:
#: a "billion laughs" document of a few hundred bytes expands to 10^9 nodes.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 100_000

DType = Literal["auto", "float32", "bfloat16", "float16"]
# Row formats a data set may hold (adapters.data.formats); "auto" finds it from the columns.
DataFormatName = Literal["auto", "text", "messages", "sharegpt", "alpaca", "prompt-completion", "preference"]


class Strict(NumbersNotBools):
    """Base for config sections: unknown keys are errors, not silently ignored; so are nan and inf
    (a non-finite learning rate or decay trains nothing and fails late), and booleans for numbers."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class QuantizationConfig(Strict):
    """``model.quantization``: load the backbone 4/8-bit with bitsandbytes (QLoRA: Dettmers et al. 2023)."""

    bits: Literal[4, 8] = Field(4, description="Load the backbone in 4-bit or 8-bit (bitsandbytes).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (QLoRA).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the matmuls; float32 on CPUs without native bf16."
    )


class ModelConfig(Strict):
    """``model``: which backbone, in which dtype, and how it is loaded."""

    name: str = Field(
        ...,
        description="Built-in name (see `adapterkit builtins`), a .gguf file (or a folder holding one), "
        "a local folder, or a hub id.",
    )
    revision: str | None = Field(None, description="Hub revision (ignored for built-ins and folders).")
    dtype: DType = Field("float32", description="Weights dtype. float32 is the fast choice on CPU.")
    quantization: QuantizationConfig | None = Field(None, description="Load the backbone quantized.")
    pooling: Literal["auto", "cls", "mean", "last"] = Field(
        "auto",
        description="How a classifier pools token states: 'auto' = mean for sentence encoders, "
        "the architecture's own head otherwise.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Override every dropout probability of the backbone (regularisation); None keeps its own.",
    )
    attn_implementation: Literal["eager", "sdpa"] | None = Field("sdpa", description="Attention kernel.")
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="'random': the same architecture freshly initialised (the from-scratch baseline)."
    )

    @field_validator("name")
    @classmethod
    def _gguf_readable(cls, name: str) -> str:
        # A GGUF is checked from its header alone (no transformers): readable, of an architecture it converts.
        check_model_name(name)
        return name


class SplitConfig(Strict):
    """``data.split``: how validation and test rows are carved out (see adapters.data.splits)."""

    kind: Literal["random", "stratified", "group", "time", "predefined"] = Field(
        "stratified", description="How held-out data is carved out of the training data."
    )
    validation: float = Field(0.1, gt=0, lt=1, description="Fraction of rows for validation.")
    test: float = Field(0.2, ge=0, lt=1, description="Fraction of rows for the held-out test set.")
    group_column: str | None = Field(None, description="Column whose values never straddle splits (kind=group).")
    time_column: str | None = Field(None, description="Timestamp column: train on the past (kind=time).")
    folds: int | None = Field(None, ge=2, le=100, description="Stratified k-fold cross-validation.")

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> SplitConfig:
        if self.validation + self.test >= 1:
            raise ConfigError(
                f"data.split: validation {self.validation} + test {self.test} leave no training rows; "
                "valid: validation + test < 1 (e.g. 0.1 and 0.2)"
            )
        return self


class TruncationConfig(Strict):
    """``data.truncation``: what gives way when a row is longer than ``data.max_length`` tokens.

    Causal-lm rows keep the prompt's markup (chat-template headers, instruction, the assistant
    header) and the response; only the input text is cut (adapters.data.prompts). Serving cuts a
    long prompt the same way, from the adapter's manifest.
    """

    prompt_side: Literal["left", "right"] | None = Field(
        None,
        description="Which end of the input text is cut: 'left' keeps its end (the part next to the answer), "
        "'right' its start. Default: left for causal-lm prompts, right for classification inputs.",
    )
    long_response: Literal["truncate", "drop"] = Field(
        "truncate",
        description="causal-lm: a response longer than the room the prompt's markup leaves is cut at its end "
        "('truncate') or its row is dropped ('drop'). Either way the data report counts them.",
    )

    def side(self, task: str) -> Literal["left", "right"]:
        """The end of the input text that is cut for `task` (prompt_side, or the task's default)."""
        if self.prompt_side is not None:
            return self.prompt_side
        return "left" if task == "causal-lm" else "right"


class DataConfig(Strict):
    """``data``: where the rows come from, which columns hold input and target, and the prompt format."""

    name: str = Field(
        ...,
        min_length=1,
        description="Built-in data set (see `adapterkit builtins`), a csv/json/jsonl/parquet file, or a hub id.",
    )
    format: DataFormatName = Field(
        "auto",
        description="Row format: messages, sharegpt, alpaca, prompt-completion, preference, or text "
        "(text_field + response_field/label_field); auto finds it from the columns (adapters.data.formats).",
    )
    text_field: str = Field("text", description="Input text column.")
    label_field: str = Field("label", description="Label column (classification) or target column.")
    response_field: str | None = Field(None, description="Target text column for causal-lm (defaults to label_field).")
    rejected_field: str = Field(
        "rejected", description="Rejected-response column of preference rows (train.objective dpo/orpo/kto/simpo)."
    )
    label_names: dict[str, str] | None = Field(None, description="Rename labels, e.g. {LOC: location}.")
    system_prompt: str | None = Field(None, description="System message for chat-template prompts.")
    instruction: str | None = Field(None, description="Text placed before each input in causal-lm prompts.")
    max_length: int = Field(
        128,
        ge=8,
        le=MAX_TOKENS,
        description="Tokens per row: the input (classification) or prompt + response (causal-lm).",
    )
    truncation: TruncationConfig = Field(default_factory=TruncationConfig)
    max_train_samples: int | None = Field(None, ge=1, description="Use at most this many training rows.")
    max_eval_samples: int | None = Field(None, ge=1, description="Use at most this many validation rows.")
    max_test_samples: int | None = Field(None, ge=1, description="Use at most this many test rows.")
    split: SplitConfig = Field(default_factory=SplitConfig)
    dedupe: bool = Field(True, description="Drop exact duplicate texts before splitting (prevents leakage).")
    strict: bool = Field(False, description="Turn data-report warnings (leakage, unseen labels) into errors.")


class EarlyStoppingConfig(Strict):
    """``train.early_stopping``: stop when a validation metric stops improving."""

    metric: str = Field("eval_loss", description="Validation metric to watch.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as improvement.")


Objective = Literal["sft", "dpo", "orpo", "kto", "simpo", "grpo"]
#: Objectives trained on (prompt, chosen, rejected) rows.
PREFERENCE_OBJECTIVES: tuple[str, ...] = ("dpo", "orpo", "kto", "simpo")
#: Reward functions GRPO knows by name (adapters.training.objectives.rewards); "module:function" imports one.
REWARD_NAMES: tuple[str, ...] = ("exact_match", "regex", "length_penalty")


class PreferenceConfig(Strict):
    """``train.preference``: the loss options of dpo, orpo, kto and simpo (adapters.training.objectives)."""

    beta: float | None = Field(
        None,
        gt=0,
        description="Temperature of the implicit reward (ORPO: the odds-ratio weight lambda). "
        "None: the objective's usual value (dpo, kto, orpo 0.1; simpo 2.0).",
    )
    loss_type: Literal["sigmoid", "hinge", "ipo"] = Field(
        "sigmoid", description="DPO's loss on the reward margin: sigmoid (DPO), hinge (SLiC), ipo (IPO)."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin gamma.")
    desirable_weight: float = Field(1.0, gt=0, description="KTO's weight of the chosen (desirable) completions.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO's weight of the rejected (undesirable) ones.")


class RewardConfig(Strict):
    """One entry of ``train.grpo.rewards``: a reward function by name, or a Python callable as "module:function"."""

    name: str = Field(..., description="exact_match, regex, length_penalty, or module:function.")
    weight: float = Field(1.0, description="Weight of this reward in the sum GRPO normalizes.")
    pattern: str | None = Field(None, description="regex: 1.0 when the pattern is found in the completion.")

    @model_validator(mode="after")
    def _known(self) -> RewardConfig:
        if self.name not in REWARD_NAMES and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.name):
            raise ConfigError(
                f"train.grpo.rewards: unknown reward {self.name!r}; valid: {', '.join(REWARD_NAMES)}, "
                "or a Python callable as 'module:function'"
            )
        if (self.name == "regex") != (self.pattern is not None):
            raise ConfigError("train.grpo.rewards: 'pattern' goes with name 'regex' (and only with it)")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ConfigError(
                    f"train.grpo.rewards: pattern {self.pattern!r} is not a regular expression: {err}"
                ) from None
        return self


class GRPOConfig(Strict):
    """``train.grpo``: group-relative policy optimization (Shao et al. 2024) with verifiable rewards."""

    num_generations: int = Field(4, ge=2, le=1024, description="Completions sampled per prompt (the group).")
    max_new_tokens: int = Field(8, ge=1, le=MAX_TOKENS, description="Tokens per sampled completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (also scales the trained log-probs).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    beta: float = Field(0.0, ge=0, description="Weight of the KL penalty to the base (adapter disabled); 0: none.")
    scale_rewards: Literal["group", "none"] = Field(
        "group", description="Divide each advantage by its group's reward std ('group') or not ('none', Dr. GRPO)."
    )
    rewards: list[RewardConfig] = Field(
        default_factory=lambda: [RewardConfig(name="exact_match")],
        min_length=1,
        description="Reward functions, summed with their weights.",
    )


class TrainConfig(Strict):
    """``train``: optimizer, schedule, budget, evaluation and checkpoint cadence."""

    lr: float = Field(2e-4, gt=0, le=MAX_LR, description="Learning rate of the adapter / backbone parameters.")
    head_lr: float | None = Field(None, gt=0, le=MAX_LR, description="Learning rate of new heads (default: lr).")
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="Layer-wise LR decay: each block deeper gets lr x decay."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never on biases and norms).")
    epochs: float = Field(
        1.0, gt=0, le=MAX_EPOCHS, description="Passes over the training data (ignored if max_steps is set)."
    )
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Optimizer steps to train for.")
    max_seconds: float | None = Field(
        None,
        gt=0,
        description="Also stop after this many seconds of training (evaluation excluded); "
        "the schedule still spans max_steps/epochs.",
    )
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Per-process micro-batch size.")
    eval_batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH, description="Micro-batches per optimizer step.")
    scheduler: Literal["constant", "linear", "cosine", "cosine_with_restarts", "step"] = Field("cosine")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Overrides warmup_ratio when > 0.")
    num_cycles: int = Field(1, ge=1, le=MAX_STEPS, description="Restarts for cosine_with_restarts.")
    step_size: int | None = Field(None, ge=1, le=MAX_STEPS, description="Steps between LR drops for 'step'.")
    step_gamma: float = Field(0.1, gt=0, le=1, description="LR multiplier at each drop for 'step'.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping (None: off).")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    eval_every: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Evaluate every N optimizer steps (None: at the end of each epoch)."
    )
    early_stopping: EarlyStoppingConfig | None = None
    save_every: int | None = Field(None, ge=1, le=MAX_STEPS, description="Write a resumable checkpoint every N steps.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed of every random number generator (numpy's range).")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="'no' on CPU: bf16 is ~20x slower there.")
    group_by_length: bool = Field(True, description="Batch rows of similar length (less padding).")
    packing: bool = Field(
        False,
        description="causal-lm: pack several training rows into each row of data.max_length tokens, "
        "attention kept within each (adapters.data.packing).",
    )
    log_every: int = Field(10, ge=1, le=MAX_STEPS)
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    unfreeze_every: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="Gradual unfreezing: start with the head alone, open one more block from the top every N units.",
    )
    unfreeze_unit: Literal["epoch", "step"] = Field("epoch", description="Unit of unfreeze_every.")
    objective: Objective = Field(
        "sft",
        description="sft (cross-entropy on the response), dpo, orpo, kto, simpo (preference rows: "
        "data.rejected_field), or grpo (sampled completions scored by train.grpo.rewards).",
    )
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    resume_trust_pickle: bool = Field(
        False,
        exclude=True,  # a permission for this invocation, not part of the run: never recorded in config.yaml
        description="Allow --resume of a DeepSpeed checkpoint: DeepSpeed's loader unpickles it, which runs any "
        "code a crafted checkpoint holds. Only for checkpoints you wrote (CLI: --trust-checkpoint).",
    )


class OutputConfig(Strict):
    """``output``: the run folder, the adapter's name and whether to publish it."""

    run_dir: str | None = Field(None, description="Run folder (default runs/<name>-<timestamp>).")
    name: str = Field("adapter", description="Adapter name, also the store name when publishing.")
    publish: bool = Field(False, description="Publish the adapter to the store when training ends.")
    store: str | None = Field(None, description="Store root (default: $ADAPTERKIT_CACHE/store).")

    @field_validator("name")
    @classmethod
    def _store_name(cls, name: str) -> str:
        # It names the run folder and the store entry: one path component, checked now, not after training.
        if not name.isprintable():
            raise ConfigError(f"output.name {name!r}: control characters (newline, tab...) are not allowed")
        return validate_name(name, "output.name")


class EvalConfig(Strict):
    """``eval``: generation budget for causal-lm evaluation, and the baselines on the test split."""

    max_new_tokens: int = Field(8, ge=1, le=MAX_TOKENS, description="Generation budget for causal-lm evaluation.")
    baseline: bool = Field(
        True,
        description="Also score baselines on the test split: the untouched base model (causal-lm); the frozen "
        "backbone with a trained head and TF-IDF + logistic regression (classification).",
    )


class MethodConfig(Strict):
    """``method``: a registered method's name and its options (validated by the method's Options)."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class RunConfig(Strict):
    """A whole run: task, model, data, method, training, evaluation and output."""

    task: Task
    model: ModelConfig
    data: DataConfig
    method: MethodConfig = Field(default_factory=lambda: MethodConfig(name="lora"))
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    init_from: str | None = Field(None, description="Continue training from a stored adapter (name@version).")

    @model_validator(mode="before")
    @classmethod
    def _method_shorthand(cls, data: Any) -> Any:
        # `method: lora` and `method: {name: lora, r: 8}` both mean MethodConfig(name, options).
        if isinstance(data, dict) and "method" in data:
            method = data["method"]
            if isinstance(method, str):
                data = {**data, "method": {"name": method, "options": {}}}
            elif isinstance(method, dict) and "options" not in method:
                rest = {k: v for k, v in method.items() if k != "name"}
                data = {**data, "method": {"name": method.get("name", "lora"), "options": rest}}
        return data

    @model_validator(mode="after")
    def _names_not_empty(self) -> RunConfig:
        if not self.model.name.strip():
            raise ConfigError(
                "model.name is empty; valid: a built-in (see `adapterkit builtins`), a folder or a hub id"
            )
        if self.init_from is not None and (not self.init_from.strip() or not self.init_from.isprintable()):
            raise ConfigError(f"init_from {self.init_from!r}: valid: a stored adapter as name@version, or a folder")
        return self

    @model_validator(mode="after")
    def _method_known_and_fits_task(self) -> RunConfig:
        method = get_method(self.method.name)  # raises ConfigError listing the valid names
        options = method.parse_options(self.method.options)  # raises ConfigError naming method.<key>
        for key, limit in METHOD_OPTION_LIMITS.items():
            value = getattr(options, key, None)
            if isinstance(value, int) and value > limit:
                raise ConfigError(f"method.{key} ({method.name}): {value} is too large; valid: 1..{limit}")
        if self.task not in method.tasks:
            raise ConfigError(
                f"method {method.name!r} does not support task {self.task!r}; "
                f"it supports: {', '.join(sorted(method.tasks))}"
            )
        if self.model.quantization is not None and not method.supports_quantized:
            able = ", ".join(m.name for m in list_methods() if m.supports_quantized)
            raise ConfigError(
                f"model.quantization: method {method.name!r} does not support a quantized backbone; "
                f"methods that do: {able} (QLoRA = lora on a 4-bit base); or drop model.quantization"
            )
        return self

    @model_validator(mode="after")
    def _packing_fits(self) -> RunConfig:
        # Packing joins causal-lm rows for the token-level SFT loss; a classifier or a pairwise loss has no use for it.
        if self.train.packing and (self.task != "causal-lm" or self.train.objective != "sft"):
            raise ConfigError(
                f"train.packing works with task causal-lm and train.objective sft, not {self.task} / "
                f"{self.train.objective}; set train.packing: false"
            )
        return self

    @model_validator(mode="after")
    def _early_stopping_metric_exists(self) -> RunConfig:
        # A metric the validation never reports would never stop the run (and never pick a best).
        stopping = self.train.early_stopping
        valid = validation_metrics(self.task, self.train.objective)
        if stopping is not None and stopping.metric not in valid:
            raise ConfigError(
                f"train.early_stopping.metric: {stopping.metric!r} is not a validation metric of {self.task}; "
                f"valid: {', '.join(valid)}"
            )
        return self

    @model_validator(mode="after")
    def _objective_fits_task(self) -> RunConfig:
        # Preference and RL objectives score generated text: only a causal LM has any.
        if self.train.objective != "sft" and self.task != "causal-lm":
            raise ConfigError(
                f"train.objective {self.train.objective!r} trains a causal LM; task {self.task!r} takes only 'sft'"
            )
        return self

    def method_options(self) -> MethodOptions:
        """The method's validated options (its Options model)."""
        return get_method(self.method.name).parse_options(self.method.options)


def validation_metrics(task: str, objective: str = "sft") -> tuple[str, ...]:
    """The metrics the validation split reports for `task` ("eval_" + the evaluator's keys,
    adapters.evaluation.evaluator): what early stopping and the ladder can watch. Causal-lm's
    eval_exact_match makes every evaluation generate answers (adapters.training.validation);
    preference objectives add PREFERENCE_METRICS (adapters.evaluation.preference)."""
    if task == "sequence-classification":
        return tuple(f"eval_{m}" for m in CLASSIFICATION_METRICS)
    extra = PREFERENCE_METRICS if objective in PREFERENCE_OBJECTIVES else ()
    return tuple(f"eval_{m}" for m in CAUSAL_LM_METRICS + GENERATION_METRICS + extra)


def _format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        key = f"{prefix}{key}" if key else prefix.rstrip(".") or "config"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r}{_valid_keys_hint(e['loc'], prefix)}")
        elif e["type"] == "missing":
            lines.append(f"missing required config key {key!r}")
        else:
            lines.append(f"config key {key!r}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
    return "; ".join(lines)


def _valid_keys_hint(loc: tuple, prefix: str) -> str:
    model: type[BaseModel] | None = RunConfig if not prefix else None
    for part in loc[:-1]:
        if model is None:
            return ""
        field = model.model_fields.get(str(part))
        if field is None:
            return ""
        ann = field.annotation
        model = next(
            (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
    if model is None:
        return ""
    return f"; valid keys here: {', '.join(model.model_fields)}"


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses duplicate keys (a second `lr:` silently wins otherwise)."""

    def construct_mapping(self, node, deep=False):
        """As SafeLoader's, but a key given twice in one mapping raises ConfigError naming it and its lines."""
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = self.construct_scalar(key_node)
                if key in seen:
                    raise ConfigError(
                        f"key {key!r} appears twice in one mapping (lines {seen[key].start_mark.line + 1} and "
                        f"{key_node.start_mark.line + 1}); keep one"
                    )
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes of the document with every alias expanded (a node reached twice counts twice), computed
    on the composed graph without expanding it; stops counting past `limit`. Raises ConfigError for a
    recursive alias (a node that contains itself)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("a YAML alias refers to a node that contains it (recursive); valid: plain values")
        active.add(key)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        total = 1
        for child in children:
            total = min(limit + 1, total + size(child))
        active.discard(key)
        sizes[key] = total
        return total

    return size(root)


def parse_yaml(text: str, source: str) -> Any:
    """The YAML document in `text` (safe types only), refusing one that expands to more than MAX_YAML_NODES
    nodes (a "billion laughs" document: aliases of aliases) before anything is built from it.

    source names the text in errors. Raises ConfigError for a syntax error (with line and column), a
    duplicate key, a recursive or over-large alias expansion, or more than one document.
    """
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise ConfigError(
                f"{source}: the YAML expands to more than {MAX_YAML_NODES:,} values (aliases of aliases?); "
                "write the values out or use fewer aliases"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {yaml_problem(err)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply; valid: a few levels of sections") from None
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(source) else f"{source}: {message}") from None
    finally:
        loader.dispose()


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a raw config dict, in place; returns it.

    Raises ConfigError for an override without '=', with an empty key, a value that is not YAML, or
    a path that runs through a non-section.
    """
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value (e.g. train.lr=2e-4)")
        path, value = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(k.strip() for k in keys):
            raise ConfigError(f"override {item!r}: empty key in {path!r}; valid: key.path=value (e.g. train.lr=2e-4)")
        parsed = parse_yaml(value, f"--set {path.strip()}")
        node = raw
        for key in keys[:-1]:
            existing = node.get(key)
            if isinstance(existing, str) and key == "method":
                existing = {"name": existing}
            if existing is None:
                existing = {}
            if not isinstance(existing, dict):
                raise ConfigError(f"override {path!r}: {key!r} is not a section")
            node[key] = existing
            node = existing
        node[keys[-1]] = parsed
    return raw


def read_config_file(path: str | Path) -> dict:
    """The raw mapping of a YAML config file. Raises ConfigError for a missing or unreadable file, one
    larger than MAX_CONFIG_BYTES, bytes that are not UTF-8, YAML that parse_yaml refuses, or a top
    level that is not a mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path}: is a folder; valid: a YAML file")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():  # a device or FIFO: reading it could block or never end
        raise ConfigError(f"--config {path}: not a plain file; valid: a YAML file")
    text = read_bounded_text(
        path,
        MAX_CONFIG_BYTES,
        ConfigError,
        too_large="{path}: larger than {limit:,} bytes; a run config is a small YAML file",
    )
    raw = parse_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys (task, model, data, ...), not a {type(raw).__name__}"
        )
    return raw


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, raw: dict | None = None
) -> RunConfig:
    """Read a YAML config (or a dict), apply dotted overrides, validate. Raises ConfigError."""
    if raw is None:
        if path is None:
            raise ConfigError("no config given: pass --config FILE")
        raw = read_config_file(path)
    raw = apply_overrides(dict(raw), overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def dump_config(cfg: RunConfig) -> dict:
    """The config as plain JSON-able data (what a run folder records)."""
    return cfg.model_dump(mode="json")
