"""The errors the application reports to clients, and how each maps to HTTP and gRPC.

    RaycacheError            (500, INTERNAL)       base; never raised for bad input
    ├── InvalidRequest       (400, INVALID_ARGUMENT)
    │   ├── PromptTooLong    (400, INVALID_ARGUMENT)
    │   └── BodyTooLarge     (413, RESOURCE_EXHAUSTED)
    ├── Unauthorized         (401, UNAUTHENTICATED)
    ├── Forbidden            (403, PERMISSION_DENIED)
    ├── ModelNotFound        (404, NOT_FOUND)
    ├── VersionConflict      (409, FAILED_PRECONDITION)
    ├── ModelUpdating        (503, UNAVAILABLE)
    ├── ModelLoading         (503, UNAVAILABLE)
    └── ReplicaUnavailable   (503, UNAVAILABLE)

Each error names the request field at fault (`param`), so a client can tell what to fix. A 503
says when to try again (`retry_after_s`, sent as HTTP `Retry-After`). The exceptions are plain
and picklable: raised in a replica, they reach a handle caller intact.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RaycacheError(Exception):
    """An error with an HTTP status, a gRPC status name, and the field at fault."""

    http_status: ClassVar[int] = 500
    grpc_status: ClassVar[str] = "INTERNAL"
    error_type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None
    retry_after_s: ClassVar[int | None] = None
    """For an error that passes (a 503): seconds after which the request may be sent again."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, param)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message

    def http_headers(self) -> dict[str, str]:
        """The headers of the HTTP error response: `Retry-After` for an error that passes."""
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}

    def to_json(self) -> dict[str, Any]:
        """The OpenAI-style error body: `{"error": {message, type, param, code}}`."""
        return {
            "error": {
                "message": str(self),
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(RaycacheError):
    """A field is missing, of the wrong type, or out of range."""

    http_status = 400
    grpc_status = "INVALID_ARGUMENT"
    error_type = "invalid_request_error"
    code = "invalid_value"


class PromptTooLong(InvalidRequest):
    """The prompt does not fit the model's context or the configured limit."""

    code = "context_length_exceeded"


class BodyTooLarge(InvalidRequest):
    """The request body is larger than the route accepts."""

    http_status = 413
    grpc_status = "RESOURCE_EXHAUSTED"
    code = "request_too_large"


class Unauthorized(RaycacheError):
    """A request lacks a valid credential: an API key, or the admin token on admin routes."""

    http_status = 401
    grpc_status = "UNAUTHENTICATED"
    error_type = "authentication_error"
    code = "invalid_token"


class Forbidden(RaycacheError):
    """The route is closed: no credential can open it until the operator configures one."""

    http_status = 403
    grpc_status = "PERMISSION_DENIED"
    error_type = "permission_error"
    code = "route_closed"


class ModelNotFound(RaycacheError):
    """The requested model is not served here."""

    http_status = 404
    grpc_status = "NOT_FOUND"
    error_type = "invalid_request_error"
    code = "model_not_found"


class VersionConflict(RaycacheError):
    """A published version would go backwards (or relabel other weights) without `force`."""

    http_status = 409
    grpc_status = "FAILED_PRECONDITION"
    error_type = "invalid_request_error"
    code = "version_conflict"


class ModelUpdating(RaycacheError):
    """The replica is switching the model to a new version and did not finish in time."""

    http_status = 503
    grpc_status = "UNAVAILABLE"
    error_type = "server_error"
    code = "model_updating"
    retry_after_s = 1


class ModelLoading(RaycacheError):
    """The model is not in the replica's memory and could not be loaded: the load failed, or
    every loaded model stayed in use for as long as the request could wait for room."""

    http_status = 503
    grpc_status = "UNAVAILABLE"
    error_type = "server_error"
    code = "model_loading"
    retry_after_s = 1


class ReplicaUnavailable(RaycacheError):
    """The replica answering the request failed or ended its stream before the answer was
    complete; the request may be sent again."""

    http_status = 503
    grpc_status = "UNAVAILABLE"
    error_type = "server_error"
    code = "replica_unavailable"
    retry_after_s = 1
