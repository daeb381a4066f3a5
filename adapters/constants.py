"""Names shared by every layer: the tasks, and the file names of an adapter folder."""

from __future__ import annotations

from typing import Literal

#: The two tasks a run can train: a causal LM on prompt/response text, or a sequence classifier.
TASKS: tuple[str, ...] = ("causal-lm", "sequence-classification")
Task = Literal["causal-lm", "sequence-classification"]

#: peft's adapter config file, next to the adapter weights.
ADAPTER_CONFIG = "adapter_config.json"
#: adapterkit's manifest in every adapter folder: base fingerprint, method, data, metrics, versions.
MANIFEST = "manifest.json"
#: peft's `adapter_names` value for a row that runs on the bare base (no adapter).
PEFT_BASE = "__base__"
