"""A fresh client process, for ``gossip_bench``'s join figure: import ``loomnet.client``,
join through one bootstrap address, and print the moment the offer table holds a
routable offer for ``--model``; then leave. Each line is ``<EVENT> <seconds>``, seconds
since this script's first statement (the interpreter's own start-up comes before; the
parent measures from the spawn).

Run: ``python bench/_join_probe.py --bootstrap <multiaddr> --model <name> --data-dir <dir>``.
"""

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402


def say(event: str) -> None:
    print(f"{event} {time.perf_counter() - T0:.4f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args()

    import trio

    from loomnet.client import ClientConfig, open_client

    say("IMPORTED")
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)

    async def run() -> None:
        config = ClientConfig(data_dir=args.data_dir, bootstrap=[args.bootstrap], discover_local=False)
        async with open_client(config) as client:
            say("STARTED")
            await client.wait_for_offers(model=args.model, timeout=30)
            say("OFFER")
        say("LEFT")

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
