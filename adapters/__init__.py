"""adapterkit: adapt pretrained transformers with parameter-efficient fine-tuning.

The import name is ``adapters``; it cannot share an environment with AdapterHub's
package of the same import name.
"""

__version__ = "0.1.0"

from adapters import _quiet  # noqa: E402,F401  (silences two third-party notices; see adapters/_quiet.py)
from adapters.errors import ConfigError  # noqa: E402

__all__ = ["ConfigError", "__version__"]
