"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status."""

from __future__ import annotations

from fastapi.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 409: "conflict_error",
         413: "invalid_request_error", 503: "service_unavailable", 500: "internal_server_error", 502: "bad_gateway"}


class APIError(Exception):
    """An error a request gets (never a crash of the server)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code if code is not None else status}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic/FastAPI validation errors -> one message naming each field, and the first field."""
    parts, first = [], None
    for error in errors:
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        field = ".".join(loc) or None
        first = first or field
        kind = error.get("type", "")
        if kind == "extra_forbidden":
            parts.append(f"unknown field '{field}'")
        elif kind == "json_invalid":
            parts.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', error.get('msg'))})")
        elif kind == "missing":
            parts.append(f"'{field}' is required")
        else:
            parts.append(f"'{field}': {error.get('msg')}" if field else str(error.get("msg")))
    return "; ".join(parts) or "invalid request", first
