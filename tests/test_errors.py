"""The one table of errors: every class's exit status and HTTP status, and what is not in it."""

from __future__ import annotations

import pytest

from aqe_retrieval import errors

TABLE = [
    # (error, exit status, HTTP status, a ValueError for plain callers?)
    (errors.InputError, 2, 400, True),
    (errors.KnnConfigError, 2, 400, True),
    (errors.QueryError, 2, 400, True),
    (errors.FilterError, 2, 400, True),
    (errors.UnknownIdError, 2, 404, False),
    (errors.ArtifactError, 1, 503, False),
    (errors.LockedError, 3, 409, False),
    (errors.QualityGateError, 4, 500, False),
]


@pytest.mark.parametrize(("cls", "exit_status", "http", "is_value_error"), TABLE)
def test_every_error_class_has_its_exit_and_http_status(cls, exit_status, http, is_value_error):
    exc = cls("boom")
    assert isinstance(exc, errors.AqeError)
    assert isinstance(exc, ValueError) is is_value_error
    assert errors.exit_code(exc) == exit_status
    assert errors.http_status(exc) == http


def test_the_table_covers_every_error_class_of_the_module():
    defined = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, errors.AqeError) and obj is not errors.AqeError
    }
    assert defined == {cls for cls, *_ in TABLE}


def test_the_named_exit_statuses():
    assert (errors.EXIT_OK, errors.EXIT_FAILED, errors.EXIT_BAD_INPUT) == (0, 1, 2)
    assert (errors.EXIT_LOCKED, errors.EXIT_REFUSED) == (3, 4)


def test_a_plain_value_error_is_bad_input():
    assert errors.exit_code(ValueError("qe_k must be >= 1")) == errors.EXIT_BAD_INPUT == 2
    assert errors.http_status(ValueError("x")) == 400


class _Subclass(errors.LockedError, ValueError):
    """A subclass of two rows: the first matching row of the table wins."""


def test_subclasses_follow_their_class_and_the_first_row_wins():
    class Damaged(errors.ArtifactError):
        pass

    assert (errors.exit_code(Damaged()), errors.http_status(Damaged())) == (1, 503)
    assert (errors.exit_code(_Subclass()), errors.http_status(_Subclass())) == (3, 409)


@pytest.mark.parametrize(
    "exc", [RuntimeError("disk on fire"), OSError(28, "No space left"), KeyError("k"), errors.AqeError("x")]
)
def test_anything_else_is_a_failure_exit_1_http_500(exc):
    assert errors.exit_code(exc) == errors.EXIT_FAILED == 1
    assert errors.http_status(exc) == 500


def test_terminated_is_sigterm_not_an_error():
    exc = errors.Terminated(143)
    assert isinstance(exc, SystemExit) and not isinstance(exc, Exception)
    assert exc.code == 143
    assert str(exc) == "stopped by SIGTERM"
    with pytest.raises(errors.Terminated):
        raise exc
