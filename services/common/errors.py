"""The project's error tree, mapped 1:1 to gRPC status codes.

Every error a user can cause is one of these; servicers translate them with
`status_code_of` so that a mistake never surfaces as UNKNOWN.
"""

from __future__ import annotations

import grpc


class NeurodissectError(Exception):
    """Base of every error the project raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class InvalidArgument(NeurodissectError):
    """A request field holds a value outside what is allowed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(NeurodissectError):
    """A named job, model, dataset, layer or stored object does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(NeurodissectError):
    """An object that must be created fresh already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(NeurodissectError):
    """The request is well formed but the system is not in a state to serve it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(NeurodissectError):
    """The caller presented no valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(NeurodissectError):
    """A limit (queue length, unit range, message size) was exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Cancelled(NeurodissectError):
    """The work was cancelled by the user."""

    code = grpc.StatusCode.CANCELLED


class Unavailable(NeurodissectError):
    """A dependency (peer service, object store) cannot be reached right now."""

    code = grpc.StatusCode.UNAVAILABLE


class StoreError(NeurodissectError):
    """The object store failed in a way that is not the caller's fault."""

    code = grpc.StatusCode.UNAVAILABLE


def status_code_of(exc: BaseException) -> grpc.StatusCode:
    """Return the gRPC status code for an exception (INTERNAL for unexpected ones)."""
    if isinstance(exc, NeurodissectError):
        return exc.code
    return grpc.StatusCode.INTERNAL
