"""Crypto and encoding: loomnet's sign, verify, encode and decode of each message,
against the raw ``cryptography`` Ed25519 and ``msgspec`` calls they are built on (the
floor), timed in the same run.

Per message (a request with a short chat, a chunk frame of 32 tokens, a receipt, a
receipt ack, an advert of 5 models):

* **sign**: ``seal(kind, message, key)`` vs. ``msgspec.msgpack.encode(message)`` plus
  ``Ed25519PrivateKey.sign(prefix + payload)``;
* **verify**: ``open_envelope(kind, envelope)`` vs. ``Ed25519PublicKey.from_public_bytes``
  + ``verify`` + a typed ``msgspec`` ``Decoder.decode`` of the payload;
* **encode frame**: ``encode_frame(encode_frame_body(frame))`` vs. ``msgspec.msgpack.encode(frame)``;
* **decode frame**: ``FrameDecoder`` + ``decode_frame`` vs. a typed ``Decoder(StreamFrame).decode``;
* for adverts, **offer-table add**: ``OfferTable.add(bytes)`` of a fresh advert from
  gossip (decode the envelope, verify, index) vs. the raw verify.

Each pair is timed ``--repeats`` times, alternating which goes first, each time over
enough calls for ~``--slice`` seconds (CPU time of this process); the figures are the
median µs per call and the median of the per-repeat ratios. No targets: the ratio says
what loomnet's checks add to the floor.

Run: ``make bench-crypto`` or ``.venv/bin/python bench/crypto_bench.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Report, add_common_args, apply_quick  # noqa: E402

from loomnet.client import OfferTable  # noqa: E402
from loomnet.protocol import (  # noqa: E402
    Advert, ChatMessage, ChunkFrame, FrameDecoder, InferenceRequest, ModelOffer, Receipt, ReceiptAck, ReceiptFrame,
    RequestFrame, SignedKind, SigningKey, StreamFrame, decode_frame, digest, encode_frame, encode_frame_body,
    open_envelope, seal,
)  # fmt: skip

NOW = time.time()


def messages(client: SigningKey, executor: SigningKey) -> dict[str, tuple[SignedKind | None, msgspec.Struct]]:
    request = InferenceRequest(
        audience=executor.peer_id, nonce=os.urandom(16), created_at=NOW, model="vendor-model-7-instruct",
        messages=[ChatMessage("system", "You are a helpful assistant. Answer briefly."),
                  ChatMessage("user", "Explain in two sentences why the sky is blue, for a child of eight.")],
        max_tokens=256, temperature=0.7, max_price_in=1_000_000, max_price_out=3_000_000, max_cost=5_000,
    )  # fmt: skip
    receipt = Receipt(
        request_digest=digest(b"request"), client=client.peer_id, model="vendor-model-7-instruct", input_tokens=41,
        output_tokens=256, count_source="backend", price_in=1_000_000, price_out=3_000_000, cost=809,
        output_digest=digest(b"text"), chunks=12, finish_reason="length", issued_at=NOW,
    )  # fmt: skip
    ack = ReceiptAck(receipt_digest=digest(b"receipt"), accepted_at=NOW, client_output_tokens=256)
    advert = Advert(
        seq=12, issued_at=NOW, ttl=30.0, addrs=[f"/ip4/10.0.0.7/tcp/4001/p2p/{executor.peer_id}"],
        models=[ModelOffer(name=f"vendor-model-{k}-instruct", aliases=[f"m{k}"], categories=["fast"],
                           context_length=32768, price_in=150_000 * (k + 1), price_out=450_000 * (k + 1),
                           capabilities=["chat", "tools", "json"], tokens_per_second=120.0) for k in range(5)],
        capacity=4, load=1,
    )  # fmt: skip
    chunk = ChunkFrame(seq=3, text=" hi" * 32)
    return {
        "request": (SignedKind.REQUEST, request),
        "chunk frame": (None, chunk),
        "receipt": (SignedKind.RECEIPT, receipt),
        "receipt ack": (SignedKind.RECEIPT_ACK, ack),
        "advert": (SignedKind.ADVERT, advert),
    }


def calls_for(fn: Callable[[], object], slice_s: float) -> int:
    """How many calls of ``fn`` take about ``slice_s`` seconds."""
    n = 1
    while True:
        t0 = time.process_time()
        for _ in range(n):
            fn()
        spent = time.process_time() - t0
        if spent >= slice_s / 10 or n >= 1 << 20:
            return max(1, int(n * slice_s / max(spent, 1e-9)))
        n *= 4


def per_call(fn: Callable[[], object], n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n


def compare(loom: Callable[[], object], floor: Callable[[], object], repeats: int, slice_s: float) -> tuple[float, float, float]:
    """(median µs loomnet, median µs floor, median ratio) over ``repeats`` alternating pairs."""
    loom(), floor()
    n_loom, n_floor = calls_for(loom, slice_s), calls_for(floor, slice_s)
    ls, fs, ratios = [], [], []
    for r in range(repeats):
        if r % 2:
            f = per_call(floor, n_floor)
            l = per_call(loom, n_loom)
        else:
            l = per_call(loom, n_loom)
            f = per_call(floor, n_floor)
        ls.append(l)
        fs.append(f)
        ratios.append(l / f)
    return statistics.median(ls) * 1e6, statistics.median(fs) * 1e6, statistics.median(ratios)


def bench(args: argparse.Namespace, report: Report) -> None:
    client, executor = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
    raw_key = Ed25519PrivateKey.from_private_bytes(executor.seed)
    raw_encode = msgspec.msgpack.encode
    frame_decoder = msgspec.msgpack.Decoder(StreamFrame)
    row = lambda case, metric, got, **kw: report.row(case, metric, "us", got[0], baseline=got[1], compare="ratio",  # noqa: E731
                                                     ratio=got[2], **kw)  # fmt: skip
    for case, (kind, message) in messages(client, executor).items():
        if kind is not None:
            prefix, typed = kind.prefix, msgspec.msgpack.Decoder(kind.message_type)
            envelope = seal(kind, message, executor)
            payload = envelope.payload
            sig = envelope.sig
            public = executor.public_key
            row(case, "sign (seal)", compare(lambda: seal(kind, message, executor),
                                             lambda: raw_key.sign(prefix + raw_encode(message)), args.repeats, args.slice),
                note=f"payload {len(payload)} B")  # fmt: skip

            def floor_verify() -> object:
                Ed25519PublicKey.from_public_bytes(public).verify(sig, prefix + payload)
                return typed.decode(payload)

            row(case, "verify (open_envelope)", compare(lambda: open_envelope(kind, envelope), floor_verify,
                                                        args.repeats, args.slice))  # fmt: skip
            frame = {"request": RequestFrame, "receipt": ReceiptFrame}.get(case)
            frame = frame(envelope) if frame is not None else None
        else:
            frame = message
        if frame is not None:
            body = encode_frame_body(frame)
            wire = encode_frame(body)
            row(case, "encode frame", compare(lambda: encode_frame(encode_frame_body(frame)), lambda: raw_encode(frame),
                                              args.repeats, args.slice), note=f"frame {len(wire)} B on the wire")  # fmt: skip

            def loom_decode() -> object:
                decoder = FrameDecoder()
                decoder.receive_data(wire)
                return decode_frame(decoder.next_frame())

            row(case, "decode frame", compare(loom_decode, lambda: frame_decoder.decode(body), args.repeats, args.slice))
    # adverts from gossip: each one a fresh signer, as a network of executors sends them
    keys = [SigningKey(os.urandom(32)) for _ in range(args.adverts)]
    _, advert = messages(client, executor)["advert"]
    wires = [raw_encode(seal(SignedKind.ADVERT, advert, k)) for k in keys]
    envelopes = [seal(SignedKind.ADVERT, advert, k) for k in keys]
    table = OfferTable()
    prefix = SignedKind.ADVERT.prefix
    t0 = time.process_time()
    for data in wires:
        table.add(data, now=NOW)
    loom = (time.process_time() - t0) / len(wires)
    t0 = time.process_time()
    for e in envelopes:
        Ed25519PublicKey.from_public_bytes(e.signer).verify(e.sig, prefix + e.payload)
    floor = (time.process_time() - t0) / len(envelopes)
    report.row("advert", "offer-table add (gossip bytes)", "us", loom * 1e6, baseline=floor * 1e6, compare="ratio",
               note=f"{len(wires)} fresh adverts, each from its own signer, into one table; floor: raw verify")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="alternating timings per pair")
    parser.add_argument("--slice", type=float, default=0.05, help="seconds of calls per timing")
    parser.add_argument("--adverts", type=int, default=2000, help="fresh adverts added to one offer table")
    add_common_args(parser)
    args = parser.parse_args(argv)
    apply_quick(args, parser, repeats=3, slice=0.01, adverts=100)
    report = Report("crypto", {k: v for k, v in vars(args).items() if k != "json"}, baseline_label="raw (floor)")
    bench(args, report)
    return report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
