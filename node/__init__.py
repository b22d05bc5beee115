"""loomnet.node — the executor daemon, its backends and the ``loomnet`` CLI.

The names below load on first use (PEP 562): ``loomnet chat`` and the other client
commands live in ``loomnet.node.cli`` and never need the executor, its server and its
backends (~60-90 ms to import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._executor import Executor as Executor, ExecutorInfo as ExecutorInfo
    from ._server import InferenceServer as InferenceServer, ServerStatistics as ServerStatistics
    from .config import ExecutorConfig as ExecutorConfig, ModelTerms as ModelTerms, load_config as load_config

__all__ = [
    "Executor", "ExecutorConfig", "ExecutorInfo", "InferenceServer", "ModelTerms", "ServerStatistics", "load_config",
]

_WHERE = {
    "Executor": "._executor",
    "ExecutorInfo": "._executor",
    "InferenceServer": "._server",
    "ServerStatistics": "._server",
    "ExecutorConfig": ".config",
    "ModelTerms": ".config",
    "load_config": ".config",
}


def __getattr__(name: str) -> Any:
    if (module := _WHERE.get(name)) is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
