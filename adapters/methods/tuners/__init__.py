"""peft tuners of our own (imported when a model is adapted: they import peft).

Importing a tuner's module registers its peft type with peft; until then peft cannot read an
adapter_config.json of that type. ``OWN_PEFT_TYPES`` says which module to import for which type
(this package itself stays free of peft).
"""

#: peft_type (as adapter_config.json spells it) -> the module whose import registers it with peft.
OWN_PEFT_TYPES = {"BOTTLENECK": "adapters.methods.tuners.bottleneck"}
