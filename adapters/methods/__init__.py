"""The adaptation methods. Each module registers itself; importing this package loads them all.

A method is one module plus its registration; a shared base carries the rest (as peft's tuners):
``base`` (AdaptationMethod, options, the registry), ``peft_base`` (methods peft implements),
``prompt_learning`` (the three virtual-token methods), ``weights_delta`` (head-only, partial and
full, which train the backbone's own weights), ``targets`` (per-architecture module names) and
``tuners`` (peft tuners of our own). Variants of one method (dora of lora, houlsby/pfeiffer of
bottleneck) are registered by the method's module.

Add a method: write ``adapters/methods/<name>.py`` with an ``AdaptationMethod`` subclass and
one ``register_method(...)`` line, then import it below. Keep peft, transformers and datasets
out of module level: config validation and ``--list-methods`` import this package.
"""

from adapters.methods import (  # noqa: F401  (each import registers its methods)
    bottleneck,
    full,
    head_only,
    ia3,
    loha,
    lokr,
    lora,
    p_tuning,
    partial,
    prefix_tuning,
    prompt_tuning,
    vera,
)
from adapters.methods.base import (  # noqa: F401
    AdaptationMethod,
    MethodOptions,
    ModelInfo,
    get_method,
    list_methods,
    method_of_folder,
    register_method,
)
