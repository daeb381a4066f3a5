"""Mean pooling + a linear head over any transformers encoder, as a transformers model class.

Sentence encoders such as MiniLM (Sentence-BERT, Reimers & Gurevych 2019) were trained to be
mean-pooled; a head on their CLS pooler starts from a representation they never optimised (0.32 vs
0.8+ on TREC, frozen). transformers has no class for "encoder + mean pooling + linear head", so this
one is saved into every artifact whose classifier mean-pools, as ``modeling_adapterkit.py`` next to
a config.json whose ``auto_map`` names it. Then, without adapterkit installed::

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    pipeline("text-classification", model=folder, trust_remote_code=True)

load it. The file is self-contained on purpose (torch and transformers; peft for an adapter): it is
copied verbatim. Weights keep transformers' standard names: the encoder under its own
``base_model_prefix`` (``bert.``, as in BertForSequenceClassification) and the head as
``classifier.``. A folder holding an adapter (adapter_config.json) and no model weights is an
adapter folder: the encoder's weights come from the adapter's ``base_model_name_or_path`` and
peft loads the adapter on top (``PeftModel.from_pretrained``: the model returned is then a
PeftModelForSequenceClassification, which pipeline takes).
"""

from __future__ import annotations

import inspect
import json
import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

# Files that hold a full model's weights; a folder with none of them and an adapter_config.json is an adapter.
_MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class MeanPoolingForSequenceClassification(PreTrainedModel):
    """An encoder (``AutoModel`` of ``config``, without its pooler) whose last hidden states are
    mean-pooled over the attention mask into a linear head of ``config.num_labels`` outputs.

    ``encoder``: an already loaded encoder to wrap (its config becomes this model's); None builds
    one from ``config``. The encoder sits under its architecture's ``base_model_prefix``
    (``bert`` for BERT), so parameter names are those of transformers' own classifiers.
    """

    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config, encoder: nn.Module | None = None):
        super().__init__(config)
        if encoder is None:
            encoder_class = AutoModel._model_mapping[type(config)]
            # BERT-like encoders build a CLS pooler by default, which mean pooling leaves unused.
            no_pooler = "add_pooling_layer" in inspect.signature(encoder_class.__init__).parameters
            encoder = AutoModel.from_config(config, **({"add_pooling_layer": False} if no_pooler else {}))
        self.base_model_prefix = getattr(type(encoder), "base_model_prefix", "") or "encoder"
        setattr(self, self.base_model_prefix, encoder)
        dropout = getattr(config, "hidden_dropout_prob", 0.1) or 0.0
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)  # initialised by post_init
        self.loss_fct = nn.CrossEntropyLoss()
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' from_pretrained; for an adapter folder (adapter_config.json and no model weights)
        the encoder comes from the adapter's ``base_model_name_or_path`` and peft loads the adapter on top
        (labels from the folder's config.json): a PeftModelForSequenceClassification is returned."""
        folder = os.fspath(pretrained_model_name_or_path)
        if kwargs.get("config") is None:  # the encoder's own config class (this class serves any architecture)
            kwargs["config"] = AutoConfig.from_pretrained(folder)
        adapter_config = os.path.join(folder, "adapter_config.json")
        has_weights = any(os.path.isfile(os.path.join(folder, name)) for name in _MODEL_WEIGHTS)
        if not os.path.isfile(adapter_config) or has_weights:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        with open(adapter_config, encoding="utf-8") as fh:
            base = json.load(fh).get("base_model_name_or_path")
        if not base:
            raise OSError(f"{adapter_config} names no base_model_name_or_path: the encoder's weights cannot be found")
        # peft is needed for adapter folders only (a merged model loads without it). peft itself loads the
        # adapter, not transformers' peft integration: that one cannot load prompt-learning adapters.
        from peft import PeftModel

        kwargs.pop("adapter_kwargs", None)
        model = super().from_pretrained(base, *model_args, **kwargs)
        return PeftModel.from_pretrained(model, folder)

    def _init_weights(self, module):
        """Only the head is this class's own; the encoder initialises itself (a loaded one is left alone)."""
        if module is getattr(self, "classifier", None):
            nn.init.normal_(module.weight, std=getattr(self.config, "initializer_range", 0.02))
            nn.init.zeros_(module.bias)

    @property
    def num_labels(self) -> int:
        """Outputs of the head (peft's sequence-classification wrapper reads it)."""
        return self.config.num_labels

    def get_input_embeddings(self):
        """The encoder's token embeddings (peft's prompt learning and resizing use them)."""
        return self.base_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        """Replace the encoder's token embeddings."""
        self.base_model.set_input_embeddings(value)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        labels=None,
        token_type_ids=None,
        past_key_values=None,
        **kwargs,
    ):
        """input_ids / attention_mask [batch, seq] (or inputs_embeds [batch, seq, hidden]), labels [batch]
        -> SequenceClassifierOutput: logits [batch, num_labels], loss (mean cross-entropy) when labels are given.

        The mask may be shorter than the states (peft prompt tokens prepended: they count as real) or
        longer (prefix tuning: the prefix has no states of its own)."""
        # past_key_values is named so that peft prefix tuning calls this forward (mean pooling intact)
        # instead of the encoder alone; the prefix keys/values reach every attention layer.
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        for unused in ("num_items_in_batch", "output_attentions", "output_hidden_states", "return_dict"):
            kwargs.pop(unused, None)
        out = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            token_type_ids=token_type_ids,
            **kwargs,
        )
        states = out.last_hidden_state  # [batch, seq, hidden]
        if attention_mask is None:
            attention_mask = torch.ones(states.shape[:2], device=states.device, dtype=torch.long)
        if attention_mask.shape[1] > states.shape[1]:  # prefix tuning: mask covers the prefix, which has no states
            attention_mask = attention_mask[:, -states.shape[1] :]
        if attention_mask.shape[1] != states.shape[1]:  # prompt tokens prepended by peft
            extra = states.shape[1] - attention_mask.shape[1]
            attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], extra), attention_mask], dim=1)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # [batch, seq, 1]
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-6)  # [batch, hidden]
        logits = self.classifier(self.dropout(pooled))  # [batch, num_labels]
        loss = self.loss_fct(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
