"""Decode-ahead: a thread fetches and decodes the next batches while the train loop runs the current
step, so the step never waits on Kafka or the codec when records are there.

Exactly-once depends on one rule: a checkpoint stores the offsets *after the last batch the loop
took*, never the source's live positions (which already include the batches decoded ahead). Each
batch therefore travels with a snapshot of the positions it ends at.

The thread decodes a group of batches per wake-up: one batch (waiting for it as the source does),
then more while the source already holds whole batches (what is left of a fetched chunk), handed
over as one list. On the CPU the training thread needs the GIL between every torch op; each time
the decoding thread wakes it takes the GIL and the step waits to get it back, so one wake-up per
fetched chunk instead of one per batch costs the step fewer hand-overs (issue 10).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .codecs import DecodedBatch, decode_batch
from .records import CodecSpec, KafkaRecord

# Batches decoded per wake-up at most: a fetched chunk's worth with the defaults (fetch_records
# 1024, batch_size 128); it bounds the memory held ahead with ``depth`` (see DecodedBatches).
GROUP_BATCHES = 8


class BatchSource(Protocol):
    """What DecodedBatches reads: workers.kafka.source.KafkaSource."""

    positions: dict[int, int]

    def next_batch(self) -> Sequence[KafkaRecord] | None: ...

    def batch_ready(self) -> bool: ...


@dataclass(frozen=True)
class ReadyBatch:
    """One batch as the loop takes it: the fetched records, their decoded tensors and rejects,
    and every partition's next offset once this batch is consumed."""

    records: Sequence[KafkaRecord]
    decoded: DecodedBatch
    positions: dict[int, int]


_Item = ReadyBatch | BaseException | None  # a batch, the source's failure, or the end of a bounded source


class DecodedBatches:
    """Iterate ready batches from a started source: :meth:`next` returns a ReadyBatch, or None once
    a bounded source is done. ``positions`` are the next offsets after the batches taken so far.
    Up to ``depth`` groups of at most ``group`` batches wait decoded in the queue, one more is
    being decoded and one is being taken (memory: (depth + 2) x group x batch_size records)."""

    def __init__(self, source: BatchSource, codec: CodecSpec, *, depth: int = 1,
                 group: int = GROUP_BATCHES) -> None:
        if depth < 1 or group < 1:
            raise ValueError(f"depth and group must be >= 1, got {depth} and {group}")
        self._source, self._codec, self._group = source, codec, group
        self._queue: queue.Queue[list[_Item]] = queue.Queue(maxsize=depth)
        self._taken: deque[_Item] = deque()  # the group the loop is taking batches from
        self._stop = threading.Event()
        self.positions: dict[int, int] = dict(source.positions)
        self._done = False
        self._thread = threading.Thread(target=self._run, name="decode-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            group = self._decode_group()
            while not self._stop.is_set():
                try:
                    self._queue.put(group, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(group[-1], ReadyBatch):
                return

    def _decode_group(self) -> list[_Item]:
        """One batch, then more while the source holds whole ones, up to ``group``; a group ends
        early at the source's failure or end, which it carries last."""
        group: list[_Item] = []
        while True:
            item: _Item
            try:
                records = self._source.next_batch()
                item = (None if records is None else
                        ReadyBatch(records, decode_batch(records, self._codec), dict(self._source.positions)))
            except BaseException as exc:  # re-raised in the loop's thread by next()
                item = exc
            group.append(item)
            if not isinstance(item, ReadyBatch) or len(group) >= self._group or not self._source.batch_ready():
                return group

    def next(self) -> ReadyBatch | None:
        """The next batch (possibly empty when nothing arrived in time); None when done."""
        if self._done:
            return None
        if not self._taken:
            self._taken.extend(self._queue.get())
        item = self._taken.popleft()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item is None:
            self._done = True
            return None
        self.positions = item.positions
        return item

    def close(self) -> None:
        """Stop decoding ahead; what was decoded and not taken is dropped (not consumed)."""
        self._stop.set()
        self._thread.join(timeout=10)
