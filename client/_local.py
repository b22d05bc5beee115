"""Finding executors on the same machine without any flag.

A running executor writes a small state file (its peer id and addresses) into the
state directory and removes it on exit; a client on the same machine reads them as
extra bootstrap addresses. Files of processes that are gone are ignored. The state
directory is ``$LOOMNET_STATE_DIR``, else ``$XDG_STATE_HOME/loomnet``, else
``~/.local/state/loomnet``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import msgspec

log = logging.getLogger("loomnet.client")

__all__ = ["LocalExecutor", "local_executors", "remove_local_executor", "state_dir", "write_local_executor"]


def state_dir() -> Path:
    if explicit := os.environ.get("LOOMNET_STATE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "loomnet"


class LocalExecutor(msgspec.Struct, frozen=True):
    peer_id: str
    addrs: list[str]
    pid: int
    #: its operator endpoint's URL (``/status``...); None: off, or an older executor
    operator: str | None = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_local_executor(peer_id: str, addrs: list[str], *, directory: Path | None = None,
                         operator: str | None = None) -> Path:  # fmt: skip
    """Announce a running executor to local clients (and its operator endpoint's URL,
    for ``loomnet status``); returns the file written."""
    folder = (directory or state_dir()) / "executors"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{peer_id}.json"
    tmp = path.with_suffix(".tmp")
    record = {"peer_id": peer_id, "addrs": addrs, "pid": os.getpid()}
    if operator is not None:
        record["operator"] = operator
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return path


def remove_local_executor(peer_id: str, *, directory: Path | None = None) -> None:
    try:
        ((directory or state_dir()) / "executors" / f"{peer_id}.json").unlink()
    except FileNotFoundError:
        pass


def local_executors(*, directory: Path | None = None) -> list[LocalExecutor]:
    """Executors announced on this machine whose process is still alive."""
    folder = (directory or state_dir()) / "executors"
    found = []
    try:
        paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    except OSError as exc:  # out of descriptors for a moment, a folder gone: none found this time
        log.debug("cannot list local executors in %s: %s", folder, exc)
        return []
    for path in paths:
        try:
            info = json.loads(path.read_text())
            peer_id, addrs, pid = str(info["peer_id"]), [str(a) for a in info["addrs"]], int(info["pid"])
            operator = info.get("operator")
            operator = operator if isinstance(operator, str) and operator.startswith("http://") else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if _alive(pid):
            found.append(LocalExecutor(peer_id, addrs, pid, operator))
    return found
