"""The parts of one answer a client has received so far, within a byte bound.

An executor may stream without end until the total deadline, and nothing a peer sends
may bloat a node: the answer's UTF-8 bytes (text, reasoning and tool calls together)
are counted as chunks arrive and refused past ``max_answer_bytes`` (64 MiB by default).
"""

from __future__ import annotations

from loomnet.protocol import ChunkFrame, ErrorCode, ProtocolError, ToolCall

__all__ = ["AnswerParts"]


class AnswerParts:
    """Text, reasoning and tool calls received, and the chunk frames they came in
    (progress chunks are counted, never held)."""

    __slots__ = ("max_bytes", "chunks", "bytes", "_texts", "_reasoning", "tool_calls")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.chunks = 0
        self.bytes = 0
        self._texts: list[str] = []  # non-empty ones only
        self._reasoning: list[str] = []
        self.tool_calls: list[ToolCall] = []

    @property
    def has_content(self) -> bool:
        return bool(self._texts or self._reasoning or self.tool_calls)

    @property
    def text(self) -> str:
        return "".join(self._texts)

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    def hold(self, frame: ChunkFrame, *, executor: str) -> None:
        """Keep ``frame``'s parts.

        Raises:
            ProtocolError: FRAME_TOO_LARGE once the answer passes ``max_bytes``.
        """
        self.chunks += 1
        self.bytes += len(frame.text.encode("utf-8", "surrogatepass"))
        self.bytes += len(frame.reasoning.encode("utf-8", "surrogatepass"))
        self.bytes += sum(len(c.name) + len(c.arguments) + len(c.id) for c in frame.tool_calls)
        if self.bytes > self.max_bytes:
            raise ProtocolError(
                f"executor {executor[-8:]} streamed an answer over the client's "
                f"{self.max_bytes}-byte maximum (max_answer_bytes)",
                code=ErrorCode.FRAME_TOO_LARGE,
            )
        if frame.text:
            self._texts.append(frame.text)
        if frame.reasoning:
            self._reasoning.append(frame.reasoning)
        self.tool_calls.extend(frame.tool_calls)
