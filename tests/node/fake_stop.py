"""Stop sequences as the runtimes apply them, for the fakes.

Every runtime the fakes stand for (OpenAI-compatible ``stop``, Ollama ``options.stop``,
Anthropic ``stop_sequences``, Gemini ``generationConfig.stopSequences``) ends the answer
where a stop sequence first appears, and leaves the sequence out of the text. A fake's
scripted answer is cut the same way, so a test sees what the runtime would send.
"""

from __future__ import annotations

__all__ = ["cut_at_stop"]


def cut_at_stop(pieces: list[str], stop: list[str] | str | None) -> tuple[list[str], str | None]:
    """``pieces`` up to the first place any stop sequence appears in their concatenation,
    split where they were split (pieces left empty are dropped), and the sequence that
    ended them (None: none appears, the pieces are returned as they are)."""
    sequences = [stop] if isinstance(stop, str) else list(stop or [])
    text = "".join(pieces)
    found = [(text.find(s), s) for s in sequences if s and s in text]
    if not found:
        return pieces, None
    cut, matched = min(found)
    kept: list[str] = []
    for piece in pieces:
        if cut <= 0:
            break
        kept.append(piece[:cut])
        cut -= len(piece)
    return [p for p in kept if p], matched
