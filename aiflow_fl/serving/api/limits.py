"""Pure request checks: the completion budget against the context length and the server's cap."""

from __future__ import annotations

from aiflow_fl.serving.api.errors import APIError


def completion_budget(prompt_tokens: int, requested: int | None, context: int, cap: int, default: int,
                      prompt_field: str = "messages") -> int:
    """How many tokens a request may generate; a 400 (vLLM's wording) when it cannot fit."""
    if requested is not None and requested > cap:
        raise APIError(400, f"max_tokens is {requested}, above this server's limit of {cap} tokens "
                            "(serving.api.max_tokens_cap).", "max_tokens", "max_tokens_above_cap")
    if prompt_tokens >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, your request has "
                            f"{prompt_tokens} input tokens. Please reduce the length of the input {prompt_field}.",
                       prompt_field, "context_length_exceeded")
    if requested is not None and prompt_tokens + requested > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the {prompt_field}, {requested} in the "
                            f"completion). Please reduce the length of the {prompt_field} or completion.",
                       "max_tokens", "context_length_exceeded")
    return requested if requested is not None else min(default, cap, context - prompt_tokens)
