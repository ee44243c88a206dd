"""sftlab: supervised fine-tuning of small language models (see README).

Importing the package only quietens two import-time messages of torchao, which transformers imports whenever it is
installed (transformers/quantizers/quantizer_torchao.py), so every command printed them:
- torchao logs a WARNING for each optional compiled kernel of its wheel that cannot load here ("Failed to load
  .../torchao/_C_mxfp8...so": a build for another Python, or for a CUDA architecture this machine lacks). sftlab
  calls none of them; they are logged at DEBUG instead (shown when DEBUG logging is on).
- torch's pytree logs that registering an Enum as a constant (as torchao does for its enums) is deprecated: a note
  to torchao's authors, dropped.
Every other message of either logger passes unchanged.
"""

from __future__ import annotations

import logging as _logging
import re as _re

_KERNEL_LOAD = _re.compile(r"Failed to load \S*torchao[/\\]_C[^/\\]*\.so\b")
_ENUM_CONSTANT = "is an Enum subclass and is now natively supported by torch.compile as an opaque value type"


class _TorchaoKernelLoad(_logging.Filter):
    def filter(self, record: _logging.LogRecord) -> bool:
        if record.levelno == _logging.WARNING and _KERNEL_LOAD.match(record.getMessage()):
            record.levelno, record.levelname = _logging.DEBUG, "DEBUG"
        return True


class _EnumConstantNote(_logging.Filter):
    def filter(self, record: _logging.LogRecord) -> bool:
        return _ENUM_CONSTANT not in record.getMessage()


_logging.getLogger("torchao").addFilter(_TorchaoKernelLoad())
_logging.getLogger("torch.utils._pytree").addFilter(_EnumConstantNote())
