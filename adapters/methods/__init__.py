"""The adaptation methods. Each module registers itself; importing this package loads them all.

Add a method: write ``adapters/methods/<name>.py`` with an ``AdaptationMethod`` subclass and
one ``register_method(...)`` line, then import it below.
"""

from adapters.methods.base import (  # noqa: F401
    AdaptationMethod,
    MethodOptions,
    ModelInfo,
    get_method,
    list_methods,
    method_of_folder,
    register_method,
)
from adapters.methods import lora  # noqa: F401,E402
from adapters.methods import ia3  # noqa: F401,E402
from adapters.methods import loha  # noqa: F401,E402
from adapters.methods import lokr  # noqa: F401,E402
from adapters.methods import vera  # noqa: F401,E402
from adapters.methods import prompt_learning  # noqa: F401,E402
from adapters.methods import bottleneck  # noqa: F401,E402
from adapters.methods import head_only  # noqa: F401,E402
from adapters.methods import partial  # noqa: F401,E402
from adapters.methods import full  # noqa: F401,E402
