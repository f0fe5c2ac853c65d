"""Engine errors, each carrying the HTTP status and OpenAI error type/code the server answers with."""
from __future__ import annotations


class EngineError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(EngineError):
    status = 400
    type = "invalid_request_error"


class PromptTooLong(BadRequest):
    code = "context_length_exceeded"


class ConversationBusy(EngineError):
    status = 409
    type = "conflict_error"
    code = "conversation_busy"


class NotFound(EngineError):
    status = 404
    type = "not_found_error"


class ConversationExpired(NotFound):
    """A turn continues a conversation the server forgot (time-to-live, capacity) without resending its history."""
    code = "conversation_expired"


class Overloaded(EngineError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"
