"""Answers that are not answers: a refused prompt, a model that only loaded.

A runtime that refuses a prompt (a content filter, a safety block, recitation, the
model's own refusal) often says so inside an otherwise successful answer: HTTP 200,
no text, and a finish reason (OpenAI ``content_filter`` or a ``refusal`` text,
Anthropic ``stop_reason: refusal``, Gemini ``promptFeedback.blockReason`` or
``finishReason: SAFETY``). Passed on as such, it would become a successful empty
receipt; treated as a failure, a client would retry it elsewhere and be refused again.
So it is its own error, :func:`content_filtered`: ``CONTENT_FILTERED``, not retryable,
naming the runtime's reason in loomnet's words. An answer cut by a filter *after* text
or tool calls streamed is not an error: it finishes as ``content_filter``.

Ollama answers an empty request by loading the model (``done_reason: "load"``) and
generating nothing; :func:`only_loaded` makes that a retryable error, never an answer.
"""

from __future__ import annotations

from loomnet.protocol import BackendError, ErrorCode

__all__ = ["content_filtered", "only_loaded"]


def content_filtered(label: str, reason: str, known: frozenset[str] | set[str], detail: str = "") -> BackendError:
    """The error for a prompt the runtime refused to answer.

    Args:
        label: the backend's label (operator's log only).
        reason: the runtime's reason code (``SAFETY``, ``content_filter``, ``refusal``).
        known: the reason codes the runtime documents; any other is told to a peer as
            ``OTHER`` (a runtime's free text never reaches a peer).
        detail: more for the operator's log (the adapter redacts the whole message, then
            clips it: nothing is cut here).
    """
    word = reason.upper() if reason.upper() in {k.upper() for k in known} else "OTHER"
    message = f"{label} refused to answer the prompt ({reason}){': ' + detail if detail else ''}"
    public = f"the model's runtime refused to answer this prompt (content filter: {word})"
    return BackendError(message, code=ErrorCode.CONTENT_FILTERED, retryable=False, public=public)


def only_loaded(label: str) -> BackendError:
    """The error for an answer that only loaded the model and generated nothing."""
    return BackendError(f"{label} only loaded the model and generated nothing (done_reason load)",
                        code=ErrorCode.BACKEND_UNAVAILABLE, retryable=True,
                        public="the model's runtime was loading the model and answered nothing; try again")
