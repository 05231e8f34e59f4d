"""What the kernel relay (workbench/relay.py) costs a kernel message, against the same ZMQ sockets connected directly.

    python -m benchmarks.relay [--pairs 2000] [--big-mb 16] [--big-pairs 20]

A ROUTER socket plays the kernel's shell, answering each request at once; two DEALER sockets play the host's, one
connected to it directly and one through a route of the relay, used in interleaved pairs (their order alternating)
so that a drift of the machine weighs on both. The small message is a Jupyter message's shape (identity, delimiter,
signature, four JSON parts); the big one is one frame of `--big-mb` MB, as a large output on iopub.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import zmq

from benchmarks.paired import added, interleaved
from workbench.connection import zmq_context
from workbench.relay import relay

SMALL = [b"<IDS|MSG>", b"0" * 64, b'{"msg_id": "' + b"1" * 32 + b'", "msg_type": "execute_request"}', b"{}", b"{}",
         b'{"code": "1", "silent": false}']


def _kernel(url: str, big: bytes, stop: threading.Event) -> None:
    """Answer each request with the same frames, or with `big` when the request is b'big'."""
    router = zmq_context().socket(zmq.ROUTER)
    router.bind(url)
    try:
        while not stop.is_set():
            if not router.poll(100):
                continue
            ident, *frames = router.recv_multipart(copy=False)
            if frames[0].bytes == b"big":
                router.send_multipart([ident, big], copy=False)
            else:
                router.send_multipart([ident, *frames], copy=False)
    finally:
        router.close(linger=0)


def _round_trip(dealer: zmq.Socket[bytes], frames: list[bytes]) -> Callable[[], None]:
    def once() -> None:
        dealer.send_multipart(frames)
        dealer.recv_multipart(copy=False)
    return once


def measure(pairs: int = 2000, big_mb: int = 16, big_pairs: int = 20) -> dict[str, Any]:
    """Round trips of a small message and of a big one, direct and through the relay, in interleaved pairs."""
    big = bytes(big_mb * 1_000_000)
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="wb-relay-") as tmp:
        url = f"ipc://{tmp}/k-1"
        kernel = threading.Thread(target=_kernel, args=(url, big, stop), daemon=True)
        kernel.start()
        route = relay().route(url, 64 * 2**20)
        direct, relayed = zmq_context().socket(zmq.DEALER), zmq_context().socket(zmq.DEALER)
        direct.connect(url)
        relayed.connect(route.url)
        try:
            small_a, small_b = interleaved(_round_trip(direct, SMALL), _round_trip(relayed, SMALL), pairs)
            big_a, big_b = interleaved(_round_trip(direct, [b"big"]), _round_trip(relayed, [b"big"]), big_pairs, warm=2)
        finally:
            direct.close(linger=0)
            relayed.close(linger=0)
            route.close()
            stop.set()
            kernel.join()
    big_direct, big_relayed = statistics.median(big_a), statistics.median(big_b)
    return {
        "small_direct_p50_us": statistics.median(small_a) * 1e6,
        "small_relayed_p50_us": statistics.median(small_b) * 1e6,
        "small_added_us": added(small_a, small_b) * 1e6,
        "big_mb": big_mb,
        "big_direct_mb_per_s": big_mb / big_direct,
        "big_relayed_mb_per_s": big_mb / big_relayed,
        "big_ratio": big_relayed / big_direct,
        "pairs": pairs, "big_pairs": big_pairs,
        "baseline": "the same DEALER/ROUTER sockets connected directly, interleaved pairs, same run",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--big-mb", type=int, default=16)
    parser.add_argument("--big-pairs", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    figures = measure(args.pairs, args.big_mb, args.big_pairs)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"kernel relay: a message's round trip, direct against through the relay ({args.pairs} interleaved pairs)")
    print(f"  small message, direct      p50 {figures['small_direct_p50_us']:8.1f} µs")
    print(f"  small message, relayed     p50 {figures['small_relayed_p50_us']:8.1f} µs")
    print(f"  added by the relay (paired median) {figures['small_added_us']:6.1f} µs   (the host/kernel round trip "
          "crosses it twice)")
    print(f"  {args.big_mb} MB reply, direct       {figures['big_direct_mb_per_s']:8.0f} MB/s")
    print(f"  {args.big_mb} MB reply, relayed      {figures['big_relayed_mb_per_s']:8.0f} MB/s   "
          f"time ratio {figures['big_ratio']:.2f}")


if __name__ == "__main__":
    main()
