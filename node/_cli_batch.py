"""``loomnet chat --batch FILE``: many prompts from a JSONL file, answered in input order.

The file holds one JSON object per line (:class:`BatchLine`); blank lines are skipped.
Each line is decoded with msgspec before the client joins the network: a line that does
not decode, or breaks a rule of the format (``prompt`` *or* ``messages``, ...), becomes
that line's error, ``BAD_REQUEST`` (209) with its line number, printed on stderr at once
and written at its place in the output; the other lines still run. Nothing is sent when
no line is usable.

The runnable lines go through ``LoomClient.chat_as_completed`` (``client/_batch``) with
``--concurrency`` requests at once; the command's other options (``--model``,
``--max-tokens``, price caps, ...) are defaults a line may override. Output: one JSON
object per input line (:class:`BatchAnswer`), in input order, each written as soon as
every line before it is done, to stdout or ``--output``. Progress goes to stderr (one
updating line on a terminal; else a line per tenth of the batch), each failure as one
``line N: error [CODE NAME]: message`` line, and a summary at the end.

Exit status: 0 when every line got an answer, 1 when any failed, 2 for a usage error.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import IO, Annotated

import click
import msgspec
from msgspec import Meta

from loomnet.client import BatchProgress, ChatRequest, ChatResult, ClientConfig, open_client
from loomnet.protocol import ChatMessage, GenerationOptions, InvalidRequest, LoomError

__all__ = [
    "BatchAnswer", "BatchError", "BatchLine", "LineDefaults", "Parsed", "answer_of", "chat_batch", "parse_batch",
    "read_batch", "run_batch_cli",
]  # fmt: skip


class BatchLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One line of a batch file. Exactly one of ``prompt`` (a user turn, after ``system``
    when given) and ``messages`` (the whole conversation, system turn included). Fields
    left out take the command's options; ``model`` and ``route`` together say where the
    line goes, so a line setting either ignores both ``--model`` and ``--route``.
    Unknown fields are errors (a typo would otherwise be dropped in silence)."""

    #: echoed back in the line's answer (say, your own key for the prompt)
    id: Annotated[str, Meta(max_length=256)] | int | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    system: str | None = None
    model: str | None = None
    #: ``cheapest``, ``fastest``, ``category:<name>``, a model
    route: str | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=1 << 20)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    seed: Annotated[int, Meta(ge=0, le=(1 << 31) - 1)] | None = None


class LineDefaults(msgspec.Struct, frozen=True, kw_only=True):
    """The command's options, as defaults of every line (prices in micro-credits)."""

    model: str | None = None
    route: str | None = None
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    max_price_in: int | None = None
    max_price_out: int | None = None
    on_premise_only: bool = False
    no_retention_only: bool = False


class Parsed(msgspec.Struct, frozen=True, kw_only=True):
    """One non-blank line: its number (from 1), its ``id``, and what it asks, or why not."""

    line: int
    id: str | int | None = None
    request: ChatRequest | None = None
    error: InvalidRequest | None = None


class BatchError(msgspec.Struct, frozen=True, kw_only=True):
    #: the stable code (``docs/errors.md``) and its name
    code: int
    name: str
    message: str


class BatchAnswer(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One output line: the answer and its receipt's facts, or the error. Costs are
    micro-credits (as in receipts); ``executor`` is the peer id that served and signed."""

    line: int
    id: str | int | None = None
    ok: bool
    text: str | None = None
    model: str | None = None
    executor: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost: int | None = None
    finish_reason: str | None = None
    #: the executors passed over before the one that answered (or before the error), briefly
    attempts: list[str] = []
    error: BatchError | None = None


_decoder = msgspec.json.Decoder(BatchLine)
_encoder = msgspec.json.Encoder()


def _line_error(n: int, message: str, field: str | None = None) -> InvalidRequest:
    return InvalidRequest(f"line {n}: {message}", field=field)


def _request_of(n: int, line: BatchLine, defaults: LineDefaults) -> ChatRequest:
    """What ``line`` asks for, with ``defaults`` for what it leaves out.

    Raises:
        InvalidRequest: ``prompt`` and ``messages`` both or neither, an empty ``messages``,
            or ``system`` with ``messages``.
    """
    if (line.prompt is None) == (line.messages is None):
        raise _line_error(n, 'give "prompt" or "messages" (exactly one)', "prompt")
    if line.messages is not None:
        if not line.messages:
            raise _line_error(n, '"messages" is empty', "messages")
        if line.system is not None:
            raise _line_error(n, '"system" goes with "prompt"; put the system turn in "messages"', "system")
        messages = list(line.messages)
    else:
        system = line.system if line.system is not None else defaults.system
        messages = ([ChatMessage("system", system)] if system else []) + [ChatMessage("user", line.prompt)]
    own_place = line.model is not None or line.route is not None
    where = (line.model, line.route) if own_place else (defaults.model, defaults.route)

    def pick(own, default):
        return own if own is not None else default

    options = GenerationOptions(
        max_tokens=pick(line.max_tokens, defaults.max_tokens),
        temperature=pick(line.temperature, defaults.temperature),
        seed=pick(line.seed, defaults.seed),
    )
    return ChatRequest(
        messages, model=where[0], route=where[1], options=options,
        max_price_in=defaults.max_price_in, max_price_out=defaults.max_price_out,
        on_premise_only=defaults.on_premise_only, no_retention_only=defaults.no_retention_only,
    )  # fmt: skip


class _IdOnly(msgspec.Struct):
    id: Annotated[str, Meta(max_length=256)] | int | None = None


def _id_of(raw: bytes) -> str | int | None:
    """The ``id`` of a line that is JSON but not a valid line, so its answer keeps it."""
    try:
        return msgspec.json.decode(raw, type=_IdOnly).id
    except (msgspec.DecodeError, RecursionError):
        return None


def parse_batch(data: bytes, defaults: LineDefaults) -> list[Parsed]:
    """Every non-blank line of a batch file, decoded (module doc); never raises for a
    bad line: that line's ``error`` says what is wrong, naming its number."""
    out: list[Parsed] = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = _decoder.decode(raw)
        except msgspec.ValidationError as exc:
            field = str(exc).rpartition("`$.")[2].rstrip("`") if "`$." in str(exc) else None
            out.append(Parsed(line=n, id=_id_of(raw), error=_line_error(n, str(exc), field)))
            continue
        except msgspec.DecodeError as exc:
            out.append(Parsed(line=n, error=_line_error(n, f"not a JSON object: {exc}")))
            continue
        try:
            out.append(Parsed(line=n, id=line.id, request=_request_of(n, line, defaults)))
        except InvalidRequest as exc:
            out.append(Parsed(line=n, id=line.id, error=exc))
    return out


def answer_of(parsed: Parsed, outcome: ChatResult | LoomError) -> BatchAnswer:
    """The output line for ``parsed`` that ended with ``outcome``."""
    attempts = [a.brief() for a in getattr(outcome, "attempts", None) or []]
    if isinstance(outcome, LoomError):
        error = BatchError(code=int(outcome.code), name=outcome.code.name, message=outcome.message)
        return BatchAnswer(line=parsed.line, id=parsed.id, ok=False, attempts=attempts, error=error)
    r = outcome.receipt
    return BatchAnswer(
        line=parsed.line, id=parsed.id, ok=True, text=outcome.text, model=r.model, executor=outcome.executor,
        input_tokens=r.input_tokens, output_tokens=r.output_tokens, cost=r.cost, finish_reason=r.finish_reason,
        attempts=attempts,
    )  # fmt: skip


class _Report:
    """Progress and failures on stderr (module doc), and the summary's sums."""

    def __init__(self, total: int, *, tty: bool) -> None:
        self.total, self.tty = total, tty
        self.bad = 0  # lines refused before the batch began
        self.failed_lines: list[int] = []
        self.tokens_in = self.tokens_out = self.cost = 0
        self.executors: Counter[str] = Counter()
        self._shown = -1
        self._began = time.monotonic()

    def progress(self, p: BatchProgress) -> None:
        done, failed = p.done + self.bad, p.failed + self.bad
        text = f"[batch] {done}/{self.total} done, {failed} failed, {p.running} running"
        if self.tty:
            click.echo(f"\r\x1b[K{text}", nl=False, err=True)
        else:
            step = max(1, self.total // 10)
            if done // step != self._shown and (done % step == 0 or done == self.total):
                self._shown = done // step
                click.echo(text, err=True)

    def ended(self, answer: BatchAnswer) -> None:
        if answer.ok:
            self.tokens_in += answer.input_tokens or 0
            self.tokens_out += answer.output_tokens or 0
            self.cost += answer.cost or 0
            self.executors[answer.executor or ""] += 1
            return
        self.failed_lines.append(answer.line)
        e = answer.error
        assert e is not None
        head = f"line {answer.line}: "
        message = e.message.removeprefix(head)  # a bad line's message names its line already
        click.echo(("\r\x1b[K" if self.tty else "") + f"{head}error [{e.code} {e.name}]: {message}", err=True)

    def summary(self) -> None:
        failed = len(self.failed_lines)
        lines = ", ".join(map(str, sorted(self.failed_lines)[:10])) + (", ..." if failed > 10 else "")
        click.echo(
            ("\n" if self.tty else "")
            + f"[batch] {self.total} line(s): {self.total - failed} answered, {failed} failed"
            + (f" (line {lines})" if failed else "")
            + f"; in {self.tokens_in} + out {self.tokens_out} tokens; cost {self.cost / 1e6:.6f} credits; "
            + f"{len(self.executors)} executor(s); {time.monotonic() - self._began:.1f} s",
            err=True,
        )


async def run_batch_cli(
    config: ClientConfig, parsed: list[Parsed], out: IO[str], *, concurrency: int
) -> int:
    """Answer ``parsed`` (module doc), writing each answer to ``out`` in input order.

    Returns:
        How many lines failed (bad lines included).
    """
    report = _Report(len(parsed), tty=sys.stderr.isatty())
    pending: dict[int, BatchAnswer] = {}
    written = 0

    def settle(index: int, answer: BatchAnswer) -> None:
        nonlocal written
        report.ended(answer)
        pending[index] = answer
        while written in pending:  # everything before it is out: write it, and what it held back
            out.write(_encoder.encode(pending.pop(written)).decode() + "\n")
            written += 1
        out.flush()

    runnable = [i for i, p in enumerate(parsed) if p.request is not None]
    for i, p in enumerate(parsed):
        if p.error is not None:
            report.bad += 1
            settle(i, answer_of(p, p.error))
    if runnable:
        async with open_client(config) as client:
            requests = [parsed[i].request for i in runnable]
            async with client.chat_as_completed(requests, concurrency=concurrency, on_progress=report.progress) as done:
                async for k, outcome in done:
                    settle(runnable[k], answer_of(parsed[runnable[k]], outcome))
    report.summary()
    return len(report.failed_lines)


def read_batch(path: str) -> bytes:
    """The file's bytes (``-``: stdin). Raises click.BadParameter when it cannot be read."""
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path!r}: {exc.strerror or exc}", param_hint="--batch") from None



def chat_batch(config: ClientConfig, batch_path: str, output: str | None, concurrency: int,
               defaults: LineDefaults) -> None:  # fmt: skip
    """``loomnet chat --batch`` (module doc). Exits 1 when any line failed.

    Raises:
        click.BadParameter: the file cannot be read or holds no line, or ``output``
            cannot be written (a usage error: exit status 2).
    """
    from .cli import _run  # the CLI's error handling (imported late: cli imports us)

    parsed = parse_batch(read_batch(batch_path), defaults)
    if not parsed:
        raise click.BadParameter(f"{batch_path!r} holds no line to answer", param_hint="--batch")
    try:
        out = sys.stdout if output is None else open(output, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise click.BadParameter(f"cannot write {output!r}: {exc.strerror or exc}", param_hint="--output") from None
    failed = [0]

    async def main() -> None:
        failed[0] = await run_batch_cli(config, parsed, out, concurrency=concurrency)

    try:
        _run(main)
    finally:
        if out is not sys.stdout:
            out.close()
    if failed[0]:
        sys.exit(1)
