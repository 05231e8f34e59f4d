#!/usr/bin/env python3
"""Copy images from the local Docker engine to other engines, with no registry: the source's `docker save` stream
goes straight into each target's `docker load` through the Engine API (docker-py), one read fanned out to every
target at once, no temporary file.

    python3 deploy/images.py --to unix:///srv/a/docker.sock --to unix:///srv/b/docker.sock workbench-kernel:latest

Exit status 0 when every image reached every target, 1 otherwise (one `error:` line per failed target).
"""
from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import docker
from docker import DockerClient

CHUNK = 1 << 20
_QUEUED = 32  # chunks in flight per target: bounds memory at CHUNK x _QUEUED x targets
_END = b""


@dataclass
class Transfer:
    """One image copied to one target: how it went."""

    target: str
    tag: str
    sent: int = 0
    seconds: float = 0.0
    error: str | None = None
    fed: bool = False  # the end of the stream reached the loader
    _chunks: queue.Queue[bytes] = field(default_factory=lambda: queue.Queue(_QUEUED), repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None


def _feed(transfer: Transfer) -> Iterator[bytes]:
    while (chunk := transfer._chunks.get()) != _END:
        transfer.sent += len(chunk)
        yield chunk
    transfer.fed = True


def _load(target: DockerClient, transfer: Transfer, image_id: str, started: float) -> None:
    try:
        for message in target.api.load_image(_feed(transfer)):
            if isinstance(message, dict) and (message.get("error") or message.get("errorDetail")):
                raise RuntimeError(str(message.get("error") or message.get("errorDetail")))
        loaded = target.images.get(transfer.tag).id
        if loaded != image_id:
            raise RuntimeError(f"{transfer.tag} is {loaded} there after the load, not {image_id}")
    except Exception as exc:
        transfer.error = f"{type(exc).__name__}: {exc}"
    finally:
        transfer.seconds = time.monotonic() - started
        while not transfer.fed:  # a failed load: keep taking chunks so the other targets are not held up
            transfer.fed = transfer._chunks.get() == _END


def copy_image(
    source: DockerClient,
    targets: Mapping[str, DockerClient],
    tag: str,
    progress: Callable[[str], None] = print,
    every: float = 5.0,
) -> list[Transfer]:
    """Copy one image (`tag`, kept as its name) from `source` to every target (name -> client) in parallel; returns
    one Transfer per target, in order, each with its error if it failed (a failed target does not stop the others)."""
    image = source.images.get(tag)
    size = int(image.attrs.get("Size") or 0)
    transfers = [Transfer(name, tag) for name in targets]
    started = time.monotonic()
    live: list[tuple[Transfer, threading.Thread]] = []
    for target, transfer in zip(targets.values(), transfers, strict=True):
        try:
            target.ping()
        except Exception as exc:
            transfer.error = f"cannot reach the engine: {type(exc).__name__}: {exc}"
            progress(f"{transfer.target}: {tag}: error: {transfer.error}")
            continue
        thread = threading.Thread(target=_load, args=(target, transfer, image.id, started), daemon=True)
        thread.start()
        live.append((transfer, thread))
    if not live:
        return transfers
    progress(f"{tag}: {size / 2**20:.0f} MiB unpacked, to {len(live)} engine(s)")
    last = started
    try:
        for chunk in image.save(chunk_size=CHUNK, named=tag):
            for transfer, _ in live:
                if transfer.error is None:
                    transfer._chunks.put(chunk)
            if time.monotonic() - last >= every:
                last = time.monotonic()
                for transfer, _ in live:
                    progress(f"{transfer.target}: {tag}: {transfer.sent / 2**20:.0f} MiB sent")
    except Exception as exc:
        for transfer, _ in live:
            transfer.error = transfer.error or f"reading {tag} from the source failed: {type(exc).__name__}: {exc}"
    finally:
        for transfer, _ in live:
            transfer._chunks.put(_END)
    for transfer, thread in live:
        thread.join()
        if transfer.ok:
            rate = transfer.sent / 2**20 / max(transfer.seconds, 1e-6)
            progress(
                f"{transfer.target}: {tag}: loaded, {transfer.sent / 2**20:.0f} MiB in {transfer.seconds:.1f} s "
                f"({rate:.0f} MiB/s)"
            )
        else:
            progress(f"{transfer.target}: {tag}: error: {transfer.error}")
    return transfers


def copy_images(
    source: DockerClient,
    targets: Mapping[str, DockerClient],
    tags: Sequence[str],
    progress: Callable[[str], None] = print,
) -> list[Transfer]:
    """Copy every tag to every target (see copy_image); returns all the transfers."""
    return [transfer for tag in tags for transfer in copy_image(source, targets, tag, progress)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", action="append", required=True, metavar="URL", help="a target engine (repeatable)")
    parser.add_argument("--from", dest="source", metavar="URL", help="the source engine (default: DOCKER_HOST)")
    parser.add_argument("tags", nargs="+", metavar="TAG")
    args = parser.parse_args(argv)
    source = docker.DockerClient(base_url=args.source) if args.source else docker.from_env()
    for tag in args.tags:
        try:
            source.images.get(tag)
        except docker.errors.ImageNotFound:
            print(f"error: {tag}: no such image on the source engine", file=sys.stderr)
            return 1
    targets: dict[str, DockerClient] = {}
    unreachable: list[Transfer] = []
    for url in args.to:
        try:
            targets[url] = docker.DockerClient(base_url=url, timeout=600)
        except Exception as exc:  # docker-py asks the engine its API version here
            error = f"cannot reach the engine: {type(exc).__name__}: {exc}"
            unreachable += [Transfer(url, tag, error=error) for tag in args.tags]
    started = time.monotonic()
    transfers = unreachable + copy_images(source, targets, args.tags, progress=lambda line: print(line, flush=True))
    failed = [t for t in transfers if not t.ok]
    for transfer in failed:
        print(f"error: {transfer.target}: {transfer.tag}: {transfer.error}", file=sys.stderr)
    print(f"{len(transfers) - len(failed)} of {len(transfers)} copies done in {time.monotonic() - started:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
