"""The base of every error the tools raise for a person to read.

Each module keeps its own error class (``ManifestError``, ``LoadError``, ``ExportError``, ...),
named for what failed; all of them derive from :class:`FlamingoExportError`, whose message says
what was wrong (which file, key, field or option) and what was expected. The CLI prints such an
error as one line and exits with status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FlamingoExportError(Exception):
    """A user-facing failure: bad input, a missing file or extra, an unusable device."""
