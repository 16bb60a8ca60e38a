"""Every error of the project, and the one table that maps them to exit and HTTP status codes.

All domain errors derive from :class:`AqeError`; those caused by a caller's input also derive
from ``ValueError`` so that plain Python callers can catch them the usual way.

=========================  ================================================  ====  =====
error                      raised when                                       exit  HTTP
=========================  ================================================  ====  =====
:class:`InputError`        gallery, ids or metadata are unusable              2     400
:class:`KnnConfigError`    a kNN or index setting FAISS cannot use            2     400
:class:`QueryError`        a query the searcher cannot answer as asked        2     400
:class:`FilterError`       a metadata filter names an unknown column or op    2     400
:class:`UnknownIdError`    a gallery id the served version does not hold      2     404
:class:`ArtifactError`     an index root or version is missing or damaged     1     503
:class:`LockedError`       another build holds the index root's lock          3     409
:class:`QualityGateError`  a build failed its quality gate; nothing published 4     500
=========================  ================================================  ====  =====

Any other exception is a failure: exit status 1, HTTP 500. :class:`Terminated` is not an error
but SIGTERM turned into an exception (exit status 143), so that a stopped job records why.
"""

from __future__ import annotations


class AqeError(Exception):
    """Base of every error the project raises on purpose."""


class InputError(AqeError, ValueError):
    """Input data that cannot be used (shape, dtype, NaN/Inf or zero rows, ids, metadata)."""


class KnnConfigError(AqeError, ValueError):
    """A kNN setting FAISS cannot use (bad factory string, too few rows to train, ...)."""


class QueryError(AqeError, ValueError):
    """A query the searcher cannot answer as asked (dimension, values, k, batch)."""


class FilterError(AqeError, ValueError):
    """A metadata filter the searcher cannot apply (unknown column, operator or value type)."""


class UnknownIdError(AqeError, LookupError):
    """A gallery id (or row number) that the served version does not hold."""


class ArtifactError(AqeError):
    """An artifact or index root is missing, incomplete, corrupt or of another format."""


class LockedError(AqeError):
    """Another run holds the build lock of this index root."""


class QualityGateError(AqeError):
    """The build's quality gate refused to publish (raised before anything is published)."""


class Terminated(SystemExit):
    """The job was stopped by SIGTERM (docker stop, a scheduler's deadline); exit status 143."""

    def __str__(self) -> str:
        return "stopped by SIGTERM"


EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_LOCKED, EXIT_REFUSED = 0, 1, 2, 3, 4

_CODES: tuple[tuple[type[BaseException], int, int], ...] = (
    # (error, exit status, HTTP status); the first matching row wins
    (QualityGateError, EXIT_REFUSED, 500),
    (LockedError, EXIT_LOCKED, 409),
    (ArtifactError, EXIT_FAILED, 503),
    (UnknownIdError, EXIT_BAD_INPUT, 404),
    (InputError, EXIT_BAD_INPUT, 400),
    (KnnConfigError, EXIT_BAD_INPUT, 400),
    (QueryError, EXIT_BAD_INPUT, 400),
    (FilterError, EXIT_BAD_INPUT, 400),
    (ValueError, EXIT_BAD_INPUT, 400),
)


def exit_code(exc: BaseException) -> int:
    """The command-line exit status for ``exc`` (see the module's table)."""
    for cls, code, _ in _CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_FAILED


def http_status(exc: BaseException) -> int:
    """The HTTP status code for ``exc`` (see the module's table)."""
    for cls, _, status in _CODES:
        if isinstance(exc, cls):
            return status
    return 500
