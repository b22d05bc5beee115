"""Keep secrets out of every text an operator or a peer may read.

Theory of operation: a secret leaks in more shapes than its raw text. httpx quotes a bad
header as a bytes repr (``b'Bearer sk-...\\n'``: the newline escaped as two characters),
a URL quotes it percent-encoded, HTTP Basic auth carries ``base64(user:key)``, JSON and
``repr`` escape it again. A :class:`Redactor` knows each configured secret in all these
forms, and also removes credentials it was never told about wherever their shape gives
them away: a URL's ``user:password@``, a query parameter named like a key
(``?api-key=...``), a ``Bearer``/``Basic`` token.

:class:`RedactingFilter` applies a redactor to whole log records (message, arguments and
the formatted traceback, whose chained httpx exceptions carry the key) and
:func:`install_log_redaction` puts it on every handler of the root logger, where it sees
the records of every library (a filter on a logger would miss records its children
propagate).

Base64 of a secret inside anything (``base64(user:key)`` for any user, the key inside an
encoded JSON body, in the standard or the URL-safe alphabet): base64 turns each 3 bytes
into 4 characters, so what the key becomes depends on the bytes before it only through
their count mod 3. For each of the 3 offsets, the characters that carry key bits only
(the first and last ones, which mix in the prefix's or the suffix's bits, dropped) are
the same whatever the prefix and suffix are: the key's base64 *core* at that offset.
Where a core appears, the whole base64 token around it is redacted. (Found by a review:
a provider echoing ``Authorization: Basic base64(user:key)`` for a user the redactor
was not told about, in a log line; a ``Basic`` shape masks that header, not the same
token in a JSON body.) A core is searched for only when it is at least
:data:`_MIN_BASE64_CORE` characters long.

Secrets shorter than :data:`MIN_SECRET` characters are not searched for by value (a
two-letter "password" would blank every word containing it); their shapes still are.

Defence in depth against a text cut short before it reached the redactor (a message
clipped to a length, a body read up to a limit): a text that *ends* with the start of a
known secret form, at least :data:`MIN_FRAGMENT` characters of it, loses that end, and
a text that *starts* with the end of one loses that start. (Code that clips a text
redacts it first; this catches the code that forgot.)
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Callable, Iterable
from urllib.parse import quote, quote_plus, unquote, urlsplit

__all__ = ["MIN_FRAGMENT", "MIN_SECRET", "MASK", "RedactingFilter", "Redactor", "install_log_redaction",
           "query_secret_names", "url_secrets"]

#: characters a secret needs before it is searched for by value
MIN_SECRET = 4
#: characters of a secret's start (or end) at the end (or start) of a text that are redacted
MIN_FRAGMENT = 6
#: what a secret is replaced with
MASK = "***"
#: base64 characters of a secret's core (48 bits) before it is searched for: a shorter
#: one could occur by chance in an innocent token, and the whole token is redacted
_MIN_BASE64_CORE = 8
#: the characters of a base64 token, both alphabets (standard ``+/``, URL-safe ``-_``)
_BASE64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_")
_URLSAFE = str.maketrans("+/", "-_")

#: query parameters whose values are credentials (Gemini ``key``, Azure ``api-key``, SAS ``sig``, ...)
_KEY_PARAM = r"(?:api[-_]?key|key|token|access[-_]?token|auth|secret|password|passwd|pwd|sig|signature|code)"
_SHAPES: list[tuple[re.Pattern[str], str]] = [
    # scheme://user:password@host, and scheme://token@host
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"<>]+@"), rf"\1{MASK}@"),
    # ?api-key=..., &key=..., also as they appear percent-encoded or inside JSON
    (re.compile(rf"(?i)([?&;]{_KEY_PARAM}=)[^&#\s'\"<>]+"), rf"\1{MASK}"),
    # Authorization header values, wherever a library quotes them
    (re.compile(r"\b([Bb]earer|BEARER|Basic)(\s+|%20|\+)[A-Za-z0-9._~+/=\\-]{6,}"), rf"\1\2{MASK}"),
]


def url_secrets(url: str | None) -> list[str]:
    """The credentials a URL carries: its userinfo (``user:password``, and the
    password alone) and the values of query parameters named like keys."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found: list[str] = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        user, _, password = userinfo.partition(":")
        found += [userinfo, unquote(userinfo), unquote(user) + ":" + unquote(password)]
        found += [password, unquote(password)] if password else [user, unquote(user)]
    for pair in re.split(r"[&;]", parts.query):
        name, _, value = pair.partition("=")
        if value and re.fullmatch(_KEY_PARAM, unquote(name), re.IGNORECASE):
            found += [value, unquote(value)]
    return found


def query_secret_names(url: str | None, *, allowed: re.Pattern[str] | None = None) -> list[str]:
    """The names of ``url``'s query parameters that carry a credential (named like a
    key: ``api-key``, ``key``, ``token``, ... as :func:`url_secrets` finds them), except
    those whose whole value matches ``allowed`` (a ``${VAR}`` reference). Never the
    values: a caller refusing the URL names the parameter only."""
    if not url:
        return []
    try:
        query = urlsplit(url).query
    except ValueError:
        return []
    names = []
    for pair in re.split(r"[&;]", query):
        name, _, value = pair.partition("=")
        if value and re.fullmatch(_KEY_PARAM, unquote(name), re.IGNORECASE):
            if allowed is None or not allowed.fullmatch(unquote(value)):
                names.append(unquote(name)[:32])
    return names


def _forms(secret: str) -> set[str]:
    """Every shape ``secret`` takes in the texts we produce or quote."""
    forms = {secret, secret.strip(), repr(secret)[1:-1], json.dumps(secret)[1:-1],
             quote(secret, safe=""), quote(secret), quote_plus(secret)}
    raw = secret.encode("utf-8", "surrogatepass")
    forms.add(repr(raw)[2:-1])  # how h11 quotes an illegal header value
    forms.add(secret.encode("unicode_escape").decode("ascii"))
    # Basic auth: of a user:password pair as httpx builds it from a URL, or of a key alone
    for blob in (raw, b":" + raw):
        forms.add(base64.b64encode(blob).decode("ascii"))
    return {f for f in forms if len(f) >= MIN_SECRET}


def _base64_cores(secret: str) -> set[str]:
    """The base64 characters that carry ``secret``'s bits only, at each of the 3 byte
    offsets a prefix can leave it at (see the module doc), in both alphabets."""
    raw = secret.encode("utf-8", "surrogatepass")
    cores = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode("ascii")
        # character i carries bits [6i, 6i + 6); the secret's are [8 * offset, 8 * (offset + len))
        core = encoded[-(-8 * offset // 6) : 8 * (offset + len(raw)) // 6]
        if len(core) >= _MIN_BASE64_CORE:
            cores |= {core, core.translate(_URLSAFE)}
    return cores


class Redactor:
    """Replaces every known secret, in every form, and every credential-shaped text.

    Args:
        secrets: raw secrets (API keys, passwords, ``user:password`` pairs); None and
            short values are ignored (see :data:`MIN_SECRET`).
    """

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._forms: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._cores: set[str] = set()  # base64 cores of the secrets (``_base64_cores``)
        self._core_pattern: re.Pattern[str] | None = None
        self._heads: set[str] = set()  # starts of forms, MIN_FRAGMENT characters or more
        self._tails: set[str] = set()  # ends of forms, likewise
        self._longest = 0
        self.add(*secrets)

    def add(self, *secrets: str | None) -> None:
        """Also redact ``secrets`` from now on."""
        for secret in secrets:
            if secret and len(secret.strip()) >= MIN_SECRET:
                self._forms |= _forms(secret)
                self._cores |= _base64_cores(secret) | _base64_cores(secret.strip())
        ordered = sorted(self._forms, key=len, reverse=True)  # longest first: no partial leftovers
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        cores = sorted(self._cores, key=len, reverse=True)
        self._core_pattern = re.compile("|".join(map(re.escape, cores))) if cores else None
        self._heads = {f[:n] for f in self._forms for n in range(MIN_FRAGMENT, len(f))}
        self._tails = {f[-n:] for f in self._forms for n in range(MIN_FRAGMENT, len(f))}
        self._longest = max(map(len, self._forms), default=0)

    def extend(self, other: "Redactor") -> None:
        """Also redact everything ``other`` redacts."""
        self._forms |= other._forms
        self._cores |= other._cores
        self.add()

    def __call__(self, text: str) -> str:
        """``text`` with every secret form and credential shape replaced by :data:`MASK`,
        and a secret's start at its end (or a secret's end at its start) too."""
        if self._core_pattern is not None:
            text = self._redact_base64(text)
        if self._pattern is not None:
            text = self._trim_fragments(self._pattern.sub(MASK, text))
        for pattern, replacement in _SHAPES:
            text = pattern.sub(replacement, text)
        return text

    def _redact_base64(self, text: str) -> str:
        """``text`` with every base64 token that holds a secret's core replaced whole
        (the token: the run of base64 characters around the core, and its ``=``
        padding). One pass over ``text`` for the cores, then only around a hit."""
        assert self._core_pattern is not None
        spans: list[tuple[int, int]] = []
        for match in self._core_pattern.finditer(text):
            start, end = match.span()
            if spans and start < spans[-1][1]:
                continue  # inside a token already redacted
            while start > 0 and text[start - 1] in _BASE64_CHARS:
                start -= 1
            while end < len(text) and text[end] in _BASE64_CHARS:
                end += 1
            pad = end
            while pad < len(text) and pad - end < 2 and text[pad] == "=":
                pad += 1
            spans.append((start, pad))
        if not spans:
            return text
        parts, at = [], 0
        for start, end in spans:
            parts += [text[at:start], MASK]
            at = end
        parts.append(text[at:])
        return "".join(parts)

    def _trim_fragments(self, text: str) -> str:
        """``text`` without a cut-off secret at either end (see the module doc)."""
        for n in range(min(len(text), self._longest), MIN_FRAGMENT - 1, -1):  # the longest fragment first
            if text[-n:] in self._heads:
                text = text[:-n] + MASK
                break
        for n in range(min(len(text), self._longest), MIN_FRAGMENT - 1, -1):
            if text[:n] in self._tails:
                text = MASK + text[n:]
                break
        return text


class RedactingFilter(logging.Filter):
    """A handler filter that redacts a record in place before any handler formats it:
    the message is rendered and redacted (arguments dropped), a traceback is formatted,
    redacted and kept as ``exc_text`` (``exc_info`` dropped: the exception objects
    themselves hold the secret), and so is ``stack_info``. Never drops a record."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_loomnet_redacted", None) is self.redactor:
            return True  # already done by this filter on another handler
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep its parts, redacted
            message = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = self.redactor(message), None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
        if record.exc_text:
            record.exc_text = self.redactor(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor(record.stack_info)
        record._loomnet_redacted = self.redactor
        return True


def install_log_redaction(redactor: Redactor, logger: logging.Logger | None = None) -> Callable[[], None]:
    """Put a :class:`RedactingFilter` on every handler of ``logger`` (default: the root
    logger) and on ``logging.lastResort``; returns the function that takes it off again.

    Handlers added later are not covered: install after logging is configured (the CLI
    configures it before the executor starts).
    """
    logger = logger if logger is not None else logging.getLogger()
    log_filter = RedactingFilter(redactor)
    handlers = [*logger.handlers, *([logging.lastResort] if logging.lastResort else [])]
    for handler in handlers:
        handler.addFilter(log_filter)

    def uninstall() -> None:
        for handler in handlers:
            handler.removeFilter(log_filter)

    return uninstall
