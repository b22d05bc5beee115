"""The fuzz targets: every decoder a peer (or a runtime behind an executor) can reach.

Each :class:`Target` pairs a strategy (what a hostile sender can produce) with a check
(what must hold whatever it sent). The property is the same everywhere, from
``docs/errors.md``: every input either decodes or raises loomnet's own typed error
(``LoomError`` with a stable ``ErrorCode``, of the classes the decoder documents),
never any other exception, never a hang, and the decoder's buffers stay within their
documented caps. A check raises ``AssertionError`` for a broken property; any other
exception escaping it is a finding too.

The CI tests (``tests/protocol/test_fuzz_*.py``, ``tests/client/test_validator_fuzz.py``,
``tests/node/test_fuzz_backend_streams.py``) run each target under the ``loomnet-ci``
settings profile (:data:`CI`); ``fuzz/run.py`` runs them with a large example budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from .backend_targets import BACKEND_TARGETS
from .protocol_targets import PROTOCOL_TARGETS

__all__ = ["CI", "TARGETS", "Target"]

settings.register_profile(
    "loomnet-ci",
    max_examples=60,
    deadline=None,  # a loaded 2-core CI machine: a hang is caught by the long run's alarm
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    derandomize=False,
    print_blob=True,
)
#: the settings every CI fuzz test runs under (``@CI`` on the test)
CI = settings.get_profile("loomnet-ci")


@dataclass(frozen=True)
class Target:
    """One decoder under fuzz: ``check(strategy's example)`` must hold for every example."""

    name: str
    doc: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]


TARGETS: dict[str, Target] = {
    name: Target(name, doc, strategy, check) for name, doc, strategy, check in (*PROTOCOL_TARGETS, *BACKEND_TARGETS)
}
