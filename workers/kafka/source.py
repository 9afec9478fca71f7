"""A rank's view of the topic: its partitions, read by a background poller into a bounded
queue, handed to the train loop as batches cut at a size or a wait, whichever comes first.

Assignment is static and rank-affine: partition p belongs to rank p mod W (assign(), no group
rebalances). Positions come from the checkpoint when there is one, else from ``start``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt

from .clients import ClientName, PartitionClient, SourceClientError, TransientClientError, make_client
from .records import RecordChunk


class StartAtTimestamp(BaseModel):
    """Start each partition at its first record with a timestamp at or after this time."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    timestamp_ms: NonNegativeInt = Field(description="Milliseconds since the Unix epoch.")


class StartAtOffsets(BaseModel):
    """Explicit next offsets per partition; partitions not listed start at the earliest."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    offsets: dict[int, NonNegativeInt] = Field(description="Partition -> next offset to read.")


class SourceSpec(BaseModel):
    """The topic a job trains on and how each worker reads its partitions."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = Field(description="Kafka bootstrap servers, host:port[,host:port].")
    topic: str = Field(description="The labelled records; dead letters go to <topic>.dlq.")
    client: ClientName = Field("confluent", description="Kafka client library: confluent-kafka (fast) or "
                                                        "kafka-python (pure Python).")
    start: Literal["earliest", "latest"] | StartAtTimestamp | StartAtOffsets = Field(
        "earliest", description="Where a new job starts; a resumed job starts at its checkpoint's offsets.")
    stop_at: Literal["never", "end"] = Field(
        "never", description="'end': finish once every partition reached the end offset snapshotted "
                             "at start and a fetch returns nothing more (bounded jobs, benchmarks).")
    batch_size: PositiveInt = Field(128, description="Records per worker per step (the global batch is W times).")
    max_wait_s: PositiveFloat = Field(0.2, description="A batch is cut after this long even if smaller.")
    queue_records: PositiveInt = Field(8192, description="Records buffered ahead of the train loop.")
    fetch_records: PositiveInt = Field(1024, description="Records asked for per poll.")
    metadata_timeout_s: PositiveFloat = Field(10.0, description="Bound on metadata calls at start.")
    health_check_s: PositiveFloat = Field(
        2.0, description="When no record arrived for this long, ask the broker for the partitions' end "
                         "offsets: an answer means 'no new data' (and gives the lag), none means a stall.")
    stall_deadline_s: PositiveFloat | None = Field(
        300.0, description="Fail the job once the broker has been unreachable this long; shorter stalls "
                           "are reported and training continues when it returns. None: wait forever.")
    client_config: dict[str, str] = Field(default_factory=dict,
                                          description="Passed to the Kafka client (SASL/SSL settings...).")


def assigned_partitions(partitions: list[int], rank: int, world_size: int) -> list[int]:
    """Partition p goes to rank p mod W; a rank may get none (fewer partitions than ranks)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return [p for p in partitions if p % world_size == rank]


class KafkaSource:
    """Batches of this rank's records. Call :meth:`start`, then :meth:`next_batch` until it
    returns None (bounded and done); :meth:`close` stops the poller.

    ``next_batch`` returns an empty batch (equal to []) when nothing arrived within
    ``max_wait_s``, so a rank with empty partitions keeps stepping with the others instead of
    blocking. Batches are RecordChunks: sequences of KafkaRecord whose columns the codec reads
    without per-record work. Memory stays bounded by ``queue_records`` however much the topic
    holds. ``positions`` are the next offsets of the records handed out so far (what a
    checkpoint stores).
    """

    def __init__(self, spec: SourceSpec, *, rank: int = 0, world_size: int = 1, group_id: str = "cicw",
                 resume_offsets: Mapping[int, int] | None = None,
                 client_factory: Callable[[], PartitionClient] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self._resume = dict(resume_offsets or {})
        self._factory = client_factory or (lambda: make_client(spec.client, spec.bootstrap_servers,
                                                               group_id, spec.client_config,
                                                               timeout_s=spec.metadata_timeout_s))
        # Whole fetched chunks travel through the queue (one put/get per fetch, not per record);
        # its bound in chunks keeps about queue_records records buffered at most.
        self._queue: queue.Queue[RecordChunk] = queue.Queue(
            maxsize=max(1, spec.queue_records // spec.fetch_records))
        # The chunk a batch was last cut from, and where its unused records start: batches are
        # sliced off it in place rather than copying the remainder at every cut.
        self._carry = RecordChunk.empty(spec.topic)
        self._carry_at = 0
        self._stop = threading.Event()
        self._poller_done = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.partitions: list[int] = []
        self.positions: dict[int, int] = {}
        self.end_offsets: dict[int, int] = {}
        self._start_positions: dict[int, int] = {}
        self._fetched: dict[int, int] = {}  # poller thread only
        # Partitions started by timestamp skip records older than it until the first that is not:
        # exact on a broker that honours ListOffsets by time, and a guard where one does not.
        self._skip_before_ms: dict[int, int] = {}
        # Next offsets past skipped records: consumed, so a checkpoint must not send them back.
        self._skipped_to: dict[int, int] = {}
        # Broker health, written by the poller only: the last time the broker answered (records or
        # a health check), the failure seen since (None while healthy), and end offsets for the lag.
        self._clock = clock
        self._last_contact = clock()
        self._trouble: str | None = None
        self._high: dict[int, int] = {}

    def start(self) -> "KafkaSource":
        client = self._factory()
        try:
            spec = self.spec
            self.partitions = assigned_partitions(client.partitions(spec.topic, spec.metadata_timeout_s),
                                                  self.rank, self.world_size)
            self.positions = self._initial_positions(client)
            self._start_positions = dict(self.positions)
            if spec.stop_at == "end":
                self.end_offsets = {p: client.watermarks(spec.topic, p, spec.metadata_timeout_s)[1]
                                    for p in self.partitions}
            if self.partitions:
                client.assign(spec.topic, self.positions)
        except BaseException:
            client.close()
            raise
        self._thread = threading.Thread(target=self._poll_loop, args=(client,), name="kafka-poller", daemon=True)
        self._thread.start()
        return self

    def _initial_positions(self, client: PartitionClient) -> dict[int, int]:
        spec, out = self.spec, {}
        timeout = spec.metadata_timeout_s
        if isinstance(spec.start, StartAtTimestamp):
            by_time = client.offsets_for_time(spec.topic, self.partitions, spec.start.timestamp_ms, timeout)
        for p in self.partitions:
            if p in self._resume:  # the checkpoint, not the group, is the source of truth
                out[p] = self._resume[p]
            elif isinstance(spec.start, StartAtOffsets) and p in spec.start.offsets:
                out[p] = spec.start.offsets[p]
            elif isinstance(spec.start, StartAtTimestamp):
                out[p] = by_time[p]
                self._skip_before_ms[p] = spec.start.timestamp_ms
            else:
                low, high = client.watermarks(spec.topic, p, timeout)
                out[p] = high if spec.start == "latest" else low
        return out

    def _poll_loop(self, client: PartitionClient) -> None:
        try:
            last_check = self._clock()
            while self.partitions and not self._stop.is_set():
                try:
                    records = client.poll(self.spec.fetch_records, 0.1)
                except TransientClientError as exc:  # the client reconnects; the deadline bounds the wait
                    self._trouble, records = str(exc), RecordChunk.empty(self.spec.topic)
                now = self._clock()
                if records:
                    self._last_contact, self._trouble = now, None
                    for p in self.partitions:
                        high = client.cached_high_watermark(self.spec.topic, p)
                        if high is not None:
                            self._high[p] = high
                elif now - last_check >= self.spec.health_check_s:
                    last_check = now
                    self._check_broker(client, now)
                if records:
                    self._fetched.update({p: o + 1 for p, o in records.last_offsets().items()})
                    if self._skip_before_ms:
                        records = self._drop_too_old(records)
                    while records and not self._stop.is_set():
                        try:
                            self._queue.put(records, timeout=0.1)  # blocks when full: bounded memory
                            break
                        except queue.Full:
                            continue
                # The broker's high watermark can trail the true end, so reaching the snapshot
                # alone is not "consumed everything": also require a fetch that returned nothing.
                if not records and self.spec.stop_at == "end" and self._reached_end():
                    break
        except BaseException as exc:  # surfaced to the train loop by next_batch
            self._error = exc
        finally:
            client.close()
            self._poller_done.set()

    def _check_broker(self, client: PartitionClient, now: float) -> None:
        """An idle fetch loop cannot tell 'no new data' from 'broker gone': ask for end offsets."""
        try:
            for p in self.partitions:
                self._high[p] = client.watermarks(self.spec.topic, p, self.spec.metadata_timeout_s)[1]
        except TransientClientError as exc:
            self._trouble = str(exc)
            return
        self._last_contact, self._trouble = now, None

    def stalled_for(self) -> float:
        """Seconds since the broker last answered, while it is failing to; 0.0 when healthy."""
        return self._clock() - self._last_contact if self._trouble is not None else 0.0

    @property
    def trouble(self) -> str | None:
        """The client's last error since the broker last answered; None when healthy."""
        return self._trouble

    def lag(self) -> int:
        """Records on this rank's partitions not yet handed out, by the last known end offsets."""
        return sum(max(high - self.positions.get(p, high), 0) for p, high in list(self._high.items()))

    def _drop_too_old(self, chunk: RecordChunk) -> RecordChunk:
        keep = [i for i, (p, o, ts) in enumerate(zip(chunk.partition_array.tolist(), chunk.offset_array.tolist(),
                                                    chunk.timestamps()))
                if not self._too_old(p, o, ts)]
        return chunk if len(keep) == len(chunk) else chunk.take(keep)

    def _too_old(self, partition: int, offset: int, timestamp_ms: int | None) -> bool:
        limit = self._skip_before_ms.get(partition)
        if limit is None:
            return False
        if timestamp_ms is not None and timestamp_ms < limit:
            self._skipped_to[partition] = offset + 1
            return True
        del self._skip_before_ms[partition]
        return False

    def _reached_end(self) -> bool:
        return all(self._fetched.get(p, self._start_positions[p]) >= self.end_offsets[p] for p in self.partitions)

    def next_batch(self) -> RecordChunk | None:
        """Up to ``batch_size`` records, waiting at most ``max_wait_s``; None once bounded and done.

        The batch is cut from whole fetched chunks without touching single records, and
        ``positions`` move to one past each partition's last record in it.
        """
        if self._error is not None:
            raise SourceClientError(f"kafka poller failed: {self._error}") from self._error
        size = self.spec.batch_size
        pieces = []
        if self._carry_at < len(self._carry):
            pieces.append(self._carry[self._carry_at:self._carry_at + size])
            self._carry_at += len(pieces[0])
        have = len(pieces[0]) if pieces else 0
        deadline = time.monotonic() + self.spec.max_wait_s
        while have < size:
            remaining = deadline - time.monotonic()
            try:
                chunk = (self._queue.get(timeout=max(remaining, 0.0)) if remaining > 0
                         else self._queue.get_nowait())
                take = size - have
                pieces.append(chunk[:take] if take < len(chunk) else chunk)
                have += len(pieces[-1])
                self._carry, self._carry_at = chunk, len(pieces[-1])
            except queue.Empty:
                if self._poller_done.is_set() and self._queue.empty() and self._carry_at >= len(self._carry):
                    if self._error is not None:
                        raise SourceClientError(f"kafka poller failed: {self._error}") from self._error
                    if not have and self.spec.stop_at == "end":
                        self._advance_positions(RecordChunk.empty(self.spec.topic))
                        return None
                    if not have:  # nothing assigned to this rank: keep the caller's pace
                        time.sleep(max(deadline - time.monotonic(), 0.0))
                        return RecordChunk.empty(self.spec.topic)
                    break
                if remaining <= 0:
                    break
        batch = RecordChunk.concat(pieces, self.spec.topic)
        self._advance_positions(batch)
        return batch

    def _advance_positions(self, batch: RecordChunk) -> None:
        # Skipped records precede every record handed out from their partition, so the larger
        # of the two next offsets is the right one.
        for p, offset in list(self._skipped_to.items()):
            self.positions[p] = max(self.positions[p], offset)
        # One past each partition's last record in the batch, as handing them out one by one would.
        self.positions.update({p: o + 1 for p, o in batch.last_offsets().items()})

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "KafkaSource":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
