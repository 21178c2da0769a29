"""Documented result codes, letter for letter, and mailpipe's exception tree.

Every code here comes from the platform documents in ``shared/seeds/``:

* :class:`MaestroResult` — LISTSERV Maestro on-demand recipients (``000_…``),
  each with the exact ``error`` text the document lists;
* :class:`SubscribeFailure` — the five ``reason.type`` values of Maestro's
  ``addSubscriberExternally.do`` (``002_…``);
* :class:`YesmailStatus` and :class:`TicketState` — Yesmail's HTTP codes and
  ticket event states (``003_…``);
* :class:`AsyncStatus` — the async-results categories every result line uses.

Exceptions::

    MailpipeError                 (carries ``transient``)
    ├── ConfigError               a bad config: key + fix, nothing is sent
    ├── InputFileError            one input file cannot be read at all
    ├── RunDirError               a run directory is missing or inconsistent
    └── DeliveryError             a send failed (transient or permanent)
        └── DeliveryStopped       the run must stop now (credentials refused, server
                                  unreachable): rows not yet answered stay untouched
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any, Literal

__all__ = [
    "ASYNC_STATUSES",
    "NEW_SUBSCRIBER_NEEDS_ID",
    "AsyncStatus",
    "ConfigError",
    "DeliveryError",
    "DeliveryStopped",
    "InputFileError",
    "MaestroResult",
    "MailpipeError",
    "RunDirError",
    "SubscribeFailure",
    "TicketState",
    "YesmailStatus",
]

AsyncStatus = Literal["completed", "failed", "ignored"]
ASYNC_STATUSES: tuple[AsyncStatus, ...] = ("completed", "failed", "ignored")


class MaestroResult(StrEnum):
    """Per-recipient ``result`` of a Maestro on-demand call, with its ``error`` text."""

    error: str

    def __new__(cls, code: str, error: str) -> MaestroResult:
        obj = str.__new__(cls, code)
        obj._value_ = code
        obj.error = error
        return obj

    SUCCESS = ("SUCCESS", "")
    PARSE_ERROR = ("PARSE_ERROR", "Parse error in JSON data")
    NO_RECIPIENTS = ("NO_RECIPIENTS", "No recipients specified")
    MAIL_JOB_NOT_FOUND = ("MAIL_JOB_NOT_FOUND", "Mail job not found")
    ILLEGAL_JOB_STATE = ("ILLEGAL_JOB_STATE", "Illegal mail job state")
    TRIGGER_CLOSED = ("TRIGGER_CLOSED", "Trigger closed")
    DATASET_NOT_FOUND = ("DATASET_NOT_FOUND", "Dataset not found")
    HOSTED_LIST_NOT_FOUND = ("HOSTED_LIST_NOT_FOUND", "Subscriber list not found")
    PROFILE_VALIDATION_ERROR = ("PROFILE_VALIDATION_ERROR", "Profile validation error")
    ADDRESS_NOT_FOUND = (
        "ADDRESS_NOT_FOUND",
        "No subscriber with specified address found and property ifNotExistsAddAndSend not set",
    )
    ADDRESS_REJECTED_BY_SUPPRESSION_LIST = (
        "ADDRESS_REJECTED_BY_SUPPRESSION_LIST",
        "Address on suppression list",
    )
    ADDRESS_REJECTED_BY_LIST_PROTECTION = (
        "ADDRESS_REJECTED_BY_LIST_PROTECTION",
        "List protection is enabled and address was previously unsubscribed or bounced too often",
    )
    SEND_ERROR = ("SEND_ERROR", "Sending failed")
    INTERNAL_ERROR = ("INTERNAL_ERROR", "Internal execution error")
    INVALID_EMAIL = ("INVALID_EMAIL", "Invalid email address")
    MISSING_EMAIL = ("MISSING_EMAIL", "Missing email address")
    INVALID_DO_UPDATE_FLAG = ("INVALID_DO_UPDATE_FLAG", "Invalid ifExistsDoUpdate property")
    INVALID_FORCE_ADD_FLAG = ("INVALID_FORCE_ADD_FLAG", "Invalid ifNotExistsAddAndSend property")
    INVALID_FORCE_DELIVERY_FLAG = (
        "INVALID_FORCE_DELIVERY_FLAG",
        "Invalid ifExistsForceSending property",
    )
    INVALID_PROFILE = ("INVALID_PROFILE", "Invalid profile property")

    def response(self, message: str | None = None) -> dict[str, str]:
        """The documented object, e.g. ``{"result":"SEND_ERROR","error":"Sending failed"}``."""
        if self is MaestroResult.SUCCESS:
            return {"result": "SUCCESS"}
        body = {"result": self.value, "error": self.error}
        if message:
            body["message"] = message
        return body


class SubscribeFailure(StrEnum):
    """``reason.type`` of a failed ``addSubscriberExternally.do`` call."""

    PARAMETER_VALIDATION_ERROR = "PARAMETER_VALIDATION_ERROR"
    SUBSCRIBE_NOT_POSSIBLE = "SUBSCRIBE_NOT_POSSIBLE"
    ALREADY_SUBSCRIBED = "ALREADY_SUBSCRIBED"
    AUTHENTICATION_REQUIRED = "AUTHENTICATION_REQUIRED"
    PROFILE_VALIDATION_ERROR = "PROFILE_VALIDATION_ERROR"

    def response(
        self,
        message: str,
        details: list[str] | None = None,
        external_subscribe_url: str | None = None,
    ) -> dict[str, object]:
        """``{"result":"FAILED","reason":{"type":…,"message":…,"details":[…]}}``."""
        reason: dict[str, object] = {"type": self.value, "message": message}
        if details:
            reason["details"] = details
        if external_subscribe_url:
            reason["externalSubscribeURL"] = external_subscribe_url
        return {"result": "FAILED", "reason": reason}


class YesmailStatus(IntEnum):
    """HTTP status codes that ``POST /v2/emails/send`` documents."""

    ACCEPTED = 202
    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    CONFLICT = 409

    @property
    def is_success(self) -> bool:
        return self is YesmailStatus.ACCEPTED


# the 400 for a recipient the platform does not know, sent without id or email (``003_…``:
# "if the recipient is not in the subscribers database, both id and email are required")
NEW_SUBSCRIBER_NEEDS_ID = "A new subscriber requires both id and email"


class TicketState(StrEnum):
    """States a Yesmail ticket and its events pass through."""

    ACCEPTED = "accepted"
    PROCESSING = "processing"
    RETRYING = "retrying"
    COMPLETED = "completed"


class MailpipeError(Exception):
    """Base of every error mailpipe raises on purpose.

    ``transient`` says whether trying again later may succeed; it alone decides
    retries.
    """

    transient: bool = False

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if transient is not None:
            self.transient = transient


class ConfigError(MailpipeError, ValueError):
    """A config value is wrong. ``key`` is the dotted path, the message says what to write."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


class InputFileError(MailpipeError):
    """An input file cannot be read at all; the message names the file and the fix."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class RunDirError(MailpipeError):
    """A run directory lacks what a stage needs (e.g. the previous stage never ran)."""


class DeliveryError(MailpipeError):
    """A delivery attempt failed; ``code`` is the platform's or server's code."""

    def __init__(self, message: str, *, code: int | str | None = None, transient: bool) -> None:
        super().__init__(message, transient=transient)
        self.code = code


class DeliveryStopped(DeliveryError):
    """Delivery cannot go on (a 401, a server that cannot be reached): stop the run at once.

    Nothing more is sent. ``partial`` holds the outcomes (``OUTCOME_SCHEMA``
    rows) of the recipients of the current chunk that were answered before the
    stop, whose response files were written; every other recipient was not sent
    and must stay untouched (pending), not failed.
    """

    def __init__(
        self, message: str, *, code: int | str | None = None, transient: bool = False
    ) -> None:
        super().__init__(message, code=code, transient=transient)
        self.partial: Any = None
