"""Decode-ahead: a thread fetches and decodes the next batch while the train loop runs the current
step, so the step never waits on Kafka or the codec when records are there.

Exactly-once depends on one rule: a checkpoint stores the offsets *after the last batch the loop
took*, never the source's live positions (which already include the batch decoded ahead). Each
batch therefore travels with a snapshot of the positions it ends at.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from .codecs import DecodedBatch, decode_batch
from .records import CodecSpec, KafkaRecord
from .source import KafkaSource


@dataclass(frozen=True)
class ReadyBatch:
    """One batch as the loop takes it: the fetched records, their decoded tensors and rejects,
    and every partition's next offset once this batch is consumed."""

    records: Sequence[KafkaRecord]
    decoded: DecodedBatch
    positions: dict[int, int]


class DecodedBatches:
    """Iterate ready batches from a started source: :meth:`next` returns a ReadyBatch, or None once
    a bounded source is done. ``positions`` are the next offsets after the batches taken so far.
    ``depth`` batches are decoded ahead (memory: depth x batch_size records)."""

    def __init__(self, source: KafkaSource, codec: CodecSpec, *, depth: int = 1) -> None:
        self._source, self._codec = source, codec
        self._queue: queue.Queue[ReadyBatch | BaseException | None] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.positions: dict[int, int] = dict(source.positions)
        self._done = False
        self._thread = threading.Thread(target=self._run, name="decode-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        item: ReadyBatch | BaseException | None
        while not self._stop.is_set():
            try:
                records = self._source.next_batch()
                item = (None if records is None else
                        ReadyBatch(records, decode_batch(records, self._codec), dict(self._source.positions)))
            except BaseException as exc:  # re-raised in the loop's thread by next()
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item is None or isinstance(item, BaseException):
                return

    def next(self) -> ReadyBatch | None:
        """The next batch (possibly empty when nothing arrived in time); None when done."""
        if self._done:
            return None
        item = self._queue.get()
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
