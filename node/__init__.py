"""loomnet.node — the executor daemon, its backends and the ``loomnet`` CLI."""

from ._executor import Executor as Executor, ExecutorInfo as ExecutorInfo
from .config import ExecutorConfig as ExecutorConfig, ModelTerms as ModelTerms, load_config as load_config

__all__ = ["Executor", "ExecutorConfig", "ExecutorInfo", "ModelTerms", "load_config"]
