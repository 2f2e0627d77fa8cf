"""The HTTP API of `retro serve`: request bodies, their validation, and one-line JSON errors.

Every request body is a pydantic model that forbids unknown fields, so a misspelt field is refused by
name instead of ignored. Errors are ``{"error": "<field>: <what to change>"}`` with a 4xx status:
malformed JSON 400, a body over ``serve.max_body_bytes`` 413, a wrong or missing field 422.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError


def not_blank(value: str) -> str:
    """A text field's validator: refuses an empty or whitespace-only value."""
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


NonBlank = Annotated[str, Field(min_length=1), AfterValidator(not_blank)]
"""A text field that must hold a non-space character."""


class CompletionRequest(BaseModel):
    """``POST /v1/completions``."""

    model_config = ConfigDict(extra="forbid")

    prompt: NonBlank
    """Text to continue (must hold at least one non-space character)."""
    max_tokens: int = Field(default=64, ge=1)
    """Tokens to generate (at most ``serve.max_tokens``)."""
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    """0 = greedy."""
    top_k: int | None = Field(default=None, ge=1)
    """Sample among the k most likely tokens."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    """Seed of this request's sampling generator (same seed, same completion)."""
    stream: bool = False
    """Stream tokens as server-sent events."""
    ignore_eos: bool = False
    """Generate ``max_tokens`` tokens even past the end-of-document token (load tests)."""


class Document(BaseModel):
    """One document of ``POST /v1/documents`` (the fields of a corpus JSONL line)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=512)
    text: NonBlank
    title: str | None = None


class DocumentsRequest(BaseModel):
    """``POST /v1/documents``."""

    model_config = ConfigDict(extra="forbid")

    documents: list[Document] = Field(min_length=1)


class RequestError(Exception):
    """A request the service refuses: ``status`` and a one-line message naming the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict[str, str]:
        """The JSON body of the error response."""
        return {"error": self.message}


def validation_message(exc: ValidationError) -> str:
    """The first error of a pydantic validation as ``<field path>: <message>``."""
    first = exc.errors()[0]
    location = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    message = first.get("msg", "invalid")
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    elif first.get("type") == "missing":
        message = "required field is missing"
    return f"{location}: {message}"


def parse_body(raw: bytes, model: type[BaseModel], max_bytes: int) -> Any:
    """Bytes of a request body -> the validated ``model``; raises ``RequestError`` (413, 400 or 422)."""
    import json

    if len(raw) > max_bytes:
        raise RequestError(
            413, f"body: {len(raw)} bytes, over the limit of {max_bytes} (serve.max_body_bytes)"
        )
    try:
        values = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body: malformed JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(values, dict):
        raise RequestError(400, "body: must be a JSON object")
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise RequestError(422, validation_message(exc)) from None


def check_limits(request: CompletionRequest, max_tokens: int, max_prompt_chars: int) -> None:
    """Refuse a completion over the service's limits (``serve.max_tokens``, ``serve.max_prompt_chars``)."""
    if request.max_tokens > max_tokens:
        raise RequestError(
            422, f"max_tokens: {request.max_tokens} is over the limit of {max_tokens} (serve.max_tokens)"
        )
    if len(request.prompt) > max_prompt_chars:
        raise RequestError(
            422,
            f"prompt: {len(request.prompt)} characters, over the limit of {max_prompt_chars} (serve.max_prompt_chars)",
        )
