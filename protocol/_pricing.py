"""What a request costs, in integer micro-credits.

Prices are micro-credits per million tokens. The cost is rounded **up** to the next
micro-credit once per receipt, so an executor never bills a fraction and a client
can recompute every receipt exactly.
"""

from __future__ import annotations

__all__ = ["cost_of", "credits_to_micro"]

_MILLION = 1_000_000


def cost_of(input_tokens: int, output_tokens: int, price_in: int, price_out: int) -> int:
    """Cost in micro-credits of ``input_tokens`` and ``output_tokens`` at the given prices."""
    total = input_tokens * price_in + output_tokens * price_out
    return -(-total // _MILLION)


def credits_to_micro(credits_per_million: float) -> int:
    """Convert a price a person writes (``0.15`` credits per million) to the wire unit."""
    if credits_per_million < 0:
        raise ValueError("a price cannot be negative")
    return round(credits_per_million * _MILLION)
