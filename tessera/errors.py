"""One exception family for every error a user can cause.

Each message says what was wrong and what to do about it; the CLI prints the message as a
single line and exits non-zero instead of showing a traceback. Internal bugs are not
`TesseraError`s: they keep their tracebacks.
"""

from __future__ import annotations


class TesseraError(Exception):
    """Base class of user-facing errors."""


class ConfigError(TesseraError, ValueError):
    """A configuration value is missing, of the wrong type, or inconsistent."""


class CheckpointError(TesseraError):
    """A checkpoint file or directory is missing, truncated, corrupt or inconsistent."""


class UnsupportedModelError(TesseraError):
    """The checkpoint describes an architecture, feature or quant type Tessera does not run."""


class ModelNotFoundError(TesseraError):
    """A model source is neither a path that exists nor a registered name."""


class TokenizerError(TesseraError):
    """The tokenizer or chat template is missing or cannot be built."""


class DataError(TesseraError):
    """A corpus, shard or manifest is empty, missing or inconsistent."""


class RequestError(TesseraError, ValueError):
    """A generation or serving request has an invalid field."""
