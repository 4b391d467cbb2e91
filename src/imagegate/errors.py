"""One error hierarchy for the whole service.

Every failure a client can cause or see is one of these. Each carries the HTTP status it maps
to and a message that says what was wrong and how to fix it; each dialect renders them through
one function into its own error body.
"""

from __future__ import annotations


class ImagegateError(Exception):
    """Base of every error imagegate reports to a client."""

    status: int = 500
    kind: str = "internal_error"
    retry_after: float | None = None
    """Seconds the client should wait before retrying (sent as Retry-After), if any."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ImagegateError):
    """A parameter is missing, malformed or not supported by the chosen model."""

    status = 400
    kind = "invalid_request_error"


class AuthenticationFailed(ImagegateError):
    status = 401
    kind = "authentication_error"


class PermissionDenied(ImagegateError):
    status = 403
    kind = "permission_error"


class UnknownModel(ImagegateError):
    """A model name that is not configured. With `models_path`, the message ends by naming the
    model list; each dialect's renderer names its own list through `listed_at`."""

    status = 404
    kind = "not_found_error"

    def __init__(
        self, message: str, *, param: str | None = None, models_path: str | None = None
    ) -> None:
        listed = f"{message} (GET {models_path} lists them)." if models_path else message
        super().__init__(listed, param=param)
        self.reason = message
        self.models_path = models_path

    def listed_at(self, models_path: str) -> UnknownModel:
        """The same error naming another model list (`/openai/v1/models`, `/v1beta/models`)."""
        if self.models_path is None or self.models_path == models_path:
            return self
        return UnknownModel(self.reason, param=self.param, models_path=models_path)


class NotFound(ImagegateError):
    status = 404
    kind = "not_found_error"


class Conflict(ImagegateError):
    """The request clashes with the state of a resource (a reused Idempotency-Key, an ended
    task cancelled)."""

    status = 409
    kind = "conflict_error"


class PayloadTooLarge(ImagegateError):
    status = 413
    kind = "payload_too_large"


class UnreadableImage(ImagegateError):
    status = 422
    kind = "unreadable_image"


class RateLimited(ImagegateError):
    status = 429
    kind = "rate_limit_error"


class ClientDisconnected(ImagegateError):
    """The client closed its connection before the answer was ready (nobody reads the answer;
    the status is for the usage row and the log, as nginx's 499)."""

    status = 499


class InternalError(ImagegateError):
    status = 500
    kind = "internal_error"


class ProviderError(ImagegateError):
    """The backend that generates images failed.

    `retryable` tells the router that another try on the same channel may succeed (429s, 5xx,
    connection errors, timeouts); `failover` that another channel may. `retry_after` is the
    upstream's Retry-After in seconds.
    """

    status = 502
    kind = "provider_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retryable: bool = False,
        failover: bool | None = None,
        retry_after: float | None = None,
        upstream_status: int | None = None,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, param=param)
        self.retryable = retryable
        self.failover = retryable if failover is None else failover
        """Another channel may succeed (bad key, unknown upstream model, or anything retryable)."""
        self.retry_after = retry_after
        self.upstream_status = upstream_status
        self.code = code
        """The upstream's own error code (e.g. "moderation_blocked"), when it sent one."""
        self.code = code
        """The upstream's own error code (e.g. "moderation_blocked"), when it sent one."""
        if status is not None:
            self.status = status


class ContentBlocked(ProviderError):
    """The upstream refused the prompt or the image on safety grounds (never retried)."""

    status = 400
    kind = "content_policy_violation"


class ProviderTimeout(ProviderError):
    status = 504
    kind = "provider_timeout"


class ConfigError(Exception):
    """The configuration is invalid; raised at startup, never to a client."""
