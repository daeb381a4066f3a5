"""Silence two third-party notices that every adapterkit run would print and no user can act on.

Imported by ``adapters/__init__.py``, so the filters are in place before bitsandbytes or peft load.
Each filter matches one exact message from one module; every other warning and log record passes,
and a ``-W`` option or ``PYTHONWARNINGS`` setting still wins (the warning filter is appended, so the
user's own filters are consulted first).
"""

from __future__ import annotations

import logging
import warnings

_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_kernels_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BNB_KERNELS_NOTICE)


# bitsandbytes (on CPUs with AVX512-BF16) tries to fetch an optional faster 4-bit matmul from the Hub's
# `kernels` package at import time; without it bitsandbytes uses its built-in CPU kernel, so nothing is lost.
logging.getLogger(_BNB_CPU_LOGGER).addFilter(_not_kernels_notice)

# peft 0.21 (the version pyproject pins) reads `is_gradient_checkpointing`, an alias transformers 5.23
# deprecated, whenever it wraps a model: the warning is about peft's code, not the user's.
warnings.filterwarnings(
    "ignore",
    message=r"`is_gradient_checkpointing` is deprecated",
    category=FutureWarning,
    module=r"transformers\.modeling_utils",
    append=True,
)
