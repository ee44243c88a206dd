"""sftlab's own error types: each is a problem already phrased for the user (file, line/record, key, what was
expected), so the CLI prints it as one `error:` line and exits 2 instead of showing a traceback.

They subclass ValueError as well, so callers that caught ValueError before keep working.
"""

from __future__ import annotations


class SftlabError(Exception):
    """Base of every error sftlab raises on bad input; the message names the file/record/key."""


class ConfigError(SftlabError, ValueError):
    """A config problem: the key, the bad value and the allowed values."""


class DataError(SftlabError, ValueError):
    """A malformed data file or record, phrased `path:line: field: expected ... (got ...)`."""


class RunDirError(SftlabError, ValueError):
    """A run directory that cannot be used as asked (not sftlab's, nothing to resume, unreadable files)."""


class CheckpointError(SftlabError, ValueError):
    """No checkpoint that verifies (checksum, finiteness, shape), naming the files that failed."""


class ModelError(SftlabError, ValueError):
    """A model that cannot be loaded or used as configured (unknown name offline, lengths beyond its positions)."""
