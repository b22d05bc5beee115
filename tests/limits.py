"""One time limit for I/O tests: fail (not hang) a test that outruns its Trio-clock budget."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import trio


def fail_after(seconds: float) -> Callable[[Any], Any]:
    """Decorate an async test so it fails after ``seconds`` instead of hanging the suite."""

    def decorate(fn: Any) -> Any:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> None:
            with trio.move_on_after(seconds) as scope:
                await fn(*args, **kwargs)
            if scope.cancelled_caught:
                pytest.fail(f"test did not finish within {seconds} s")

        return wrapper

    return decorate
