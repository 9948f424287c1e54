"""Typed API errors, raised in one place (:func:`error_for`) from an HTTP status.

Callers catch the case they expect (``except NotFound``) instead of comparing numbers, and
every error says what was being done (job, record, object) and the API server's own
explanation (its ``Status`` message), never request headers or tokens.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import KubemrError
from ..scrub import scrub


class KubeApiError(KubemrError):
    """An API call failed; ``status`` is the HTTP status (0: no response at all)."""

    def __init__(self, context: str, status: int, reason: str,
                 body: dict[str, Any] | None = None) -> None:
        # The server's message may echo what was sent (a Secret's data in a refused write).
        reason = scrub(reason)
        super().__init__(f"{context}: HTTP {status}: {reason}")
        self.context = context
        self.status = status
        self.reason = reason
        #: The decoded ``Status`` object the server sent, if it sent one.
        self.body: dict[str, Any] = body or {}

    @property
    def transient(self) -> bool:
        """Whether the same request may succeed later (throttling, server trouble)."""
        return self.status == 429 or self.status >= 500


#: Seconds after an API server came back during which it may still refuse what it allowed
#: before (401/403): a restarted server answers before its authentication and RBAC caches
#: have caught up (seen here: workers' own patches refused with 403 right after a restart).
SETTLING_SECONDS = 60.0


def transient_after_outage(exc: KubeApiError, since_outage: float | None) -> bool:
    """Whether ``exc`` may pass if the request is sent again: transient, or a 401/403
    within :data:`SETTLING_SECONDS` of the server last failing to answer
    (``since_outage`` seconds ago; None: it never did)."""
    if exc.transient:
        return True
    return (exc.status in (401, 403) and since_outage is not None
            and since_outage < SETTLING_SECONDS)


class BadRequest(KubeApiError):
    """400: the request (often a patch or a field selector) is malformed."""


class Unauthorized(KubeApiError):
    """401: no valid credentials."""


class Forbidden(KubeApiError):
    """403: RBAC does not allow it (or a namespace is terminating)."""


class NotFound(KubeApiError):
    """404: the object (or its namespace, or the resource type) does not exist."""


class Conflict(KubeApiError):
    """409: the object exists already, or an update lost to a newer resourceVersion."""


class Gone(KubeApiError):
    """410: a watch or list asked for a resourceVersion the server no longer keeps."""


class Unprocessable(KubeApiError):
    """422: invalid against the schema, or a JSON Patch that did not apply."""

    @property
    def lost_race(self) -> bool:
        """A patch that did not apply (a failed ``test`` or a missing path).

        The API server answers it with a bare 422, while schema validation lists its
        causes: a 422 without causes is the lost race the claim protocol expects.
        """
        return not (self.body.get("details") or {}).get("causes")


class TooManyRequests(KubeApiError):
    """429: throttled (priority and fairness, or a CRD whose storage is initialising)."""


class ServerError(KubeApiError):
    """5xx: the API server or etcd is in trouble; worth retrying."""


_BY_STATUS: dict[int, type[KubeApiError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    410: Gone, 422: Unprocessable, 429: TooManyRequests,
}


def decode_status(body: bytes | str | None) -> dict[str, Any]:
    """The ``Status`` object in an error response body, or {} if it holds none."""
    if not body:
        return {}
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return decoded if isinstance(decoded, dict) else {}


def status_message(body: bytes | str | None, fallback: str = "") -> str:
    """The API server's explanation inside an error response body."""
    status = decode_status(body)
    if status.get("message"):
        return str(status["message"])
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    # Not a Status: a plain "404 page not found\n", or a proxy's HTML page. One line, as
    # every error is: it ends up in `kubemr: error: ...`, a task record, an Event.
    return " ".join(body[:500].split()) if body and body.strip() else fallback


def error_for(context: str, status: int, body: bytes | str | None = None,
              fallback: str = "") -> KubeApiError:
    """The typed error for an HTTP ``status`` (and its response ``body``)."""
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else KubeApiError)
    return cls(context, status, status_message(body, fallback), decode_status(body))
