"""Replay of bundled real data: the canonical sample (``--source replay``) and raw block files
(``--source blocks``).

Replay timing. The sample's transactions come from whole blocks: all transactions of a block share
the block's timestamp and their mempool arrival times were never recorded. "Real time" is therefore
defined as: the sample is cut into blocks (consecutive runs of one ``block_height``, in file order),
block k starts at ``k * 600 s`` (Bitcoin's target block interval) and its n transactions are spread
evenly over those 600 s: transaction i at ``k * 600 + i * 600 / n``. Speed N divides every offset by N;
speed 0 sends as fast as possible. Gaps of years between the sample's blocks are not reproduced.

Re-stamping. Each replayed transaction gets ``first_seen`` = the wall-clock time it is handed to the
producer and ``source = "replay"``, so event-time windows downstream see live-looking data. Every other
field is the recorded one.

Looping (``replay_loop``). Loop 0 replays the original hashes; loop L ≥ 1 replaces each hash with
``sha256((original_hash + str(L)).encode("ascii")).hexdigest()``, so each loop is new data for
dedup/MERGE and two runs produce the same hashes. Timing continues across loops (loop L starts where
loop L-1 ended).

Hot path. Each line is validated once at start-up, re-serialized canonically and split around the
hash and ``first_seen`` values; publishing a record is then two byte-slice concatenations, with no
JSON parsing per message.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from btc_anomaly.ingestion.partitioning import partitions_for
from btc_anomaly.ingestion.records import Encoded, Failure, Item
from btc_anomaly.schema import InvalidTransaction, Transaction, parse_transaction

if TYPE_CHECKING:
    from btc_anomaly.ingestion.decode import DecodedBlock

log = logging.getLogger(__name__)

BLOCK_INTERVAL_S = 600.0
_ISO_LEN = len("2024-01-01T00:00:00.000000Z")
_HASH_LEN = 64


# --- timing ----------------------------------------------------------------------------------------


def block_offsets(
    heights: Sequence[int | None], interval_s: float = BLOCK_INTERVAL_S
) -> tuple[list[float], float]:
    """Seconds from replay start of each transaction, and the length of one loop.

    ``heights`` is the block_height of each transaction in file order; a block is a consecutive run of
    one height (unconfirmed transactions, height None, form runs too).
    """
    offsets: list[float] = []
    n_blocks = 0
    i = 0
    while i < len(heights):
        j = i
        while j < len(heights) and heights[j] == heights[i]:
            j += 1
        n = j - i
        start = n_blocks * interval_s
        offsets.extend(start + k * interval_s / n for k in range(n))
        n_blocks += 1
        i = j
    return offsets, n_blocks * interval_s


def loop_hash(original: str, loop: int) -> str:
    """The hash a transaction carries in replay loop ``loop`` (loop 0 keeps the original)."""
    if loop == 0:
        return original
    return hashlib.sha256((original + str(loop)).encode("ascii")).hexdigest()


class IsoStamper:
    """``first_seen`` bytes for a Unix time, formatted exactly as schema.Transaction.to_json_bytes does.

    The date part is cached per second: strftime per message would cost more than the rest of the
    replay path.
    """

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = b""

    def __call__(self, unix: float) -> bytes:
        micros = int(unix * 1_000_000)
        second, us = divmod(micros, 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)).encode()
        return self._prefix + b"%06dZ" % us


# --- sample replay ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Template:
    hash: str
    unconfirmed: bool
    head: bytes  # everything before the hash value
    middle: bytes  # between the hash value and the first_seen value
    tail: bytes  # after the first_seen value
    prefix: bytes  # head + hash + middle, for loop 0


def _template(tx: Transaction) -> _Template:
    data = tx.model_copy(update={"source": "replay"}).to_json_bytes()
    h = data.index(b'"hash":"') + len(b'"hash":"')
    f = data.index(b'"first_seen":"') + len(b'"first_seen":"')
    if (
        not h < f
        or data[h + _HASH_LEN : h + _HASH_LEN + 1] != b'"'
        or data[f + _ISO_LEN : f + _ISO_LEN + 1] != b'"'
    ):
        raise ValueError("canonical JSON layout changed: hash must precede first_seen")  # schema.py owns it
    head, middle, tail = data[:h], data[h + _HASH_LEN : f], data[f + _ISO_LEN :]
    return _Template(tx.hash, tx.block_height is None, head, middle, tail, head + tx.hash.encode() + middle)


def read_lines(paths: Iterable[Path]) -> Iterator[bytes]:
    for path in paths:
        with open(path, "rb") as probe:
            gzipped = probe.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    yield line.rstrip(b"\r\n")


class ReplaySource:
    """Iterator of :class:`Encoded` (and :class:`Failure` for bad lines) replaying canonical JSON lines.

    ``clock`` (monotonic) and ``sleep`` drive pacing and ``wall`` gives the re-stamped ``first_seen``;
    tests inject all three. Iteration ends early when ``stop`` is set.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        speed: float = 0.0,
        loop: bool = False,
        num_partitions: int | None = None,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if speed < 0:
            raise ValueError("replay speed must be >= 0")
        self.speed = speed
        self.loop = loop
        self.num_partitions = num_partitions
        self._stop = stop or threading.Event()
        self._clock = clock
        self._sleep = sleep or self._stop.wait
        self._wall = wall
        self.templates: list[_Template] = []
        self.failures: list[tuple[int, Failure]] = []  # (position in the good records, failure)
        heights: list[int | None] = []
        for line in read_lines(paths):
            try:
                tx = parse_transaction(line)
            except InvalidTransaction as exc:
                self.failures.append(
                    (len(self.templates), Failure(raw=line, reason=exc.reason, source="replay"))
                )
                continue
            self.templates.append(_template(tx))
            heights.append(tx.block_height)
        self.offsets, self.loop_length = block_offsets(heights)

    def __len__(self) -> int:
        return len(self.templates)

    def _partitions(self, hashes: list[str]) -> list[int | None]:
        if not self.num_partitions:
            return [None] * len(hashes)
        return list(partitions_for([h.encode() for h in hashes], self.num_partitions))

    def __iter__(self) -> Iterator[Item]:
        templates = self.templates
        failures = self.failures
        stop = self._stop
        stamp = IsoStamper()
        wall = self._wall
        speed = self.speed
        start = self._clock()
        loop = 0
        while True:
            if loop == 0:
                hashes = [t.hash for t in templates]
            else:
                hashes = [loop_hash(t.hash, loop) for t in templates]
            partitions = self._partitions(hashes)
            base = loop * self.loop_length
            next_failure = 0
            for i, t in enumerate(templates):
                if loop == 0:
                    while next_failure < len(failures) and failures[next_failure][0] == i:
                        yield failures[next_failure][1]
                        next_failure += 1
                if speed:
                    delay = start + (base + self.offsets[i]) / speed - self._clock()
                    if delay > 0:
                        self._sleep(delay)
                        if stop.is_set():
                            return
                if i & 255 == 0 and stop.is_set():
                    return
                if loop == 0:
                    value = t.prefix + stamp(wall()) + t.tail
                else:
                    value = t.head + hashes[i].encode() + t.middle + stamp(wall()) + t.tail
                yield Encoded(hashes[i], t.unconfirmed, value, "replay", partitions[i])
            if loop == 0:
                yield from (f for _, f in failures[next_failure:])
            if not self.loop or not templates or stop.is_set():
                return
            loop += 1


# --- raw block files -------------------------------------------------------------------------------

DLQ_BLOCK_RAW_MAX = 64 * 1024  # a whole block does not fit a Kafka message; the DLQ keeps its start


class BlockFileSource:
    """Transactions decoded from raw block files (binary, hex, ``blk*.dat`` frames; ``.gz`` is fine).

    Transactions keep what decoding gives them: ``first_seen`` = block time, ``block_height`` = the
    BIP34 height, ``source = "block"``; fees are exact when ``prevouts`` covers the block's external
    spends. A file that cannot be decoded becomes one :class:`Failure` naming the file.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        prevout_paths: Sequence[Path] = (),
        stop: threading.Event | None = None,
    ) -> None:
        from btc_anomaly.ingestion.decode import PrevoutIndex, load_prevouts

        self.paths = list(paths)
        self.prevouts = PrevoutIndex()
        for p in prevout_paths:
            self.prevouts.update(load_prevouts(p))
        self._stop = stop or threading.Event()

    def __iter__(self) -> Iterator[Item]:
        prevouts = self.prevouts or None
        for path in self.paths:
            if self._stop.is_set():
                return
            data = Path(path).read_bytes()
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            try:
                for block in decode_blocks(data, prevouts):
                    log.info("%s: block %s, %d transactions", path, block.hash, len(block.transactions))
                    yield from block.transactions
            except InvalidTransaction as exc:
                yield Failure(
                    raw=data[:DLQ_BLOCK_RAW_MAX], reason=f"{Path(path).name}: {exc.reason}", source="block"
                )


def decode_blocks(data: bytes, prevouts: Mapping[Any, Any] | None) -> Iterator[DecodedBlock]:
    """Every block in ``data``: one block (binary or hex), or ``blk*.dat`` frames up to zero padding.

    decode.iter_blk_file does the same from a path; this works on bytes so gzipped files need no
    temporary copy.
    """
    from btc_anomaly.ingestion.decode import BLK_MAGIC, decode_block

    if data[:4] != BLK_MAGIC:
        yield decode_block(data, prevouts=prevouts)
        return
    offset = 0
    while offset + 8 <= len(data) and data[offset : offset + 4] == BLK_MAGIC:
        end = offset + 8 + int.from_bytes(data[offset + 4 : offset + 8], "little")
        yield decode_block(data[offset:end], prevouts=prevouts)
        offset = end
    if data[offset:].strip(b"\x00"):
        raise InvalidTransaction(f"unexpected bytes at offset {offset} after the last blk frame")
