"""The base of synrep's own errors.

Every error that synrep raises for something a user can fix derives from :class:`SynrepError` and keeps
the builtin it replaced (``ValueError``, ``RuntimeError``, ``FileNotFoundError``) as a second base, so
``except ValueError`` still catches it. The command line prints such an error as one line and exits with
code 2; any other exception is a bug (or an error from the operating system, such as a full disk) and
keeps its traceback.
"""

from __future__ import annotations


class SynrepError(Exception):
    """An error synrep explains in one line: bad input, missing data, a refused resume..."""


class SettingsChanged(SynrepError, ValueError):
    """A refused resume: the output folder already holds results made with other settings."""
