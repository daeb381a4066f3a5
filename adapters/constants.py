"""Names shared by every layer: the tasks, the metrics each task reports, and the file names of an adapter folder."""

from __future__ import annotations

from typing import Literal

#: The two tasks a run can train: a causal LM on prompt/response text, or a sequence classifier.
TASKS: tuple[str, ...] = ("causal-lm", "sequence-classification")
Task = Literal["causal-lm", "sequence-classification"]

#: What each task's evaluator reports (adapters.evaluation.evaluator); the validation split's
#: metrics carry an "eval_" prefix (adapters.config.validation_metrics).
CLASSIFICATION_METRICS: tuple[str, ...] = (
    "loss",
    "accuracy",
    "f1_macro",
    "f1_micro",
    "precision_macro",
    "recall_macro",
    "mcc",
)
CAUSAL_LM_METRICS: tuple[str, ...] = ("loss", "perplexity")
#: Causal-lm metrics of generated answers: measured only when the evaluation generates.
GENERATION_METRICS: tuple[str, ...] = ("exact_match",)
#: Causal-lm metrics of preference pairs (adapters.evaluation.preference), on data with rejected responses.
PREFERENCE_METRICS: tuple[str, ...] = ("preference_accuracy", "logp_margin")

#: peft's adapter config file, next to the adapter weights.
ADAPTER_CONFIG = "adapter_config.json"
#: peft's adapter weights file: only the tensors the method trained.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: adapterkit's manifest in every adapter folder: base fingerprint, method, data, metrics, versions.
MANIFEST = "manifest.json"
#: peft's `adapter_names` value for a row that runs on the bare base (no adapter).
PEFT_BASE = "__base__"
#: Runtimes ``adapterkit parity`` compares adapterkit's engine with (adapters.serving.parity).
RUNTIMES: tuple[str, ...] = ("peft", "transformers", "vllm", "gguf")
