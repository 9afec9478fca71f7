"""A rank's view of the topic: its partitions, read by a background poller into a bounded
queue, handed to the train loop as batches cut at a size or a wait, whichever comes first.

Assignment is static and rank-affine: partition p belongs to rank p mod W (assign(), no group
rebalances). Positions come from the checkpoint when there is one, else from ``start``; a
partition the checkpoint does not list (added since) starts at its earliest offset. Partitions
added while the job runs are adopted through :meth:`KafkaSource.add_partitions`. A position the
broker no longer has fails the job unless ``offset_reset`` says where to continue.

Threads: the Kafka client belongs to the poller thread. ``next_batch`` (and ``positions``)
belong to the one thread that takes batches; ``topic_partition_count`` and ``add_partitions``
may be called from any thread: they hand their work to the poller and never touch the client.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt

from ..errors import OffsetOutOfRangeError
from .clients import ClientName, FetchOutOfRange, PartitionClient, SourceClientError, TransientClientError, make_client
from .records import RecordChunk

log = logging.getLogger(__name__)


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
    offset_reset: Literal["fail", "earliest", "latest"] = Field(
        "fail", description="A position the broker no longer has (a resumed offset outside the partition's "
                            "range: retention deleted it, or the topic was recreated; or records deleted "
                            "before they were read): 'fail' stops the job naming the partition and the "
                            "broker's range; 'earliest' or 'latest' continue from that end, with a warning "
                            "saying what was skipped or replayed.")
    partition_refresh_s: PositiveFloat | None = Field(
        60.0, description="How often the loop checks for new partitions at a checkpoint boundary (a new "
                          "partition is read from its earliest offset); None: never.")


# How long a partition-count query may take: the loop waits for it at a checkpoint boundary.
PARTITION_COUNT_TIMEOUT_S = 2.0


def assigned_partitions(partitions: list[int], rank: int, world_size: int) -> list[int]:
    """Partition p goes to rank p mod W; a rank may get none (fewer partitions than ranks)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return [p for p in partitions if p % world_size == rank]


@dataclass(frozen=True)
class OffsetReset:
    """A position the broker no longer had (``offset`` outside [``low``, ``high``]) and where the
    source continued instead (``reset_to``): at ``resume`` (a checkpoint's offset) or at a ``fetch``."""

    partition: int
    offset: int
    low: int
    high: int
    reset_to: int
    when: Literal["resume", "fetch"]

    def consequence(self) -> str:
        """What the reset skipped or replays, in words."""
        if self.offset < self.low:
            deleted = f"records [{self.offset}, {self.low}) were deleted before they were read"
            return deleted if self.reset_to == self.low else f"{deleted}; [{self.low}, {self.reset_to}) are skipped"
        ended = f"the partition now ends at {self.high} (recreated or truncated)"
        if self.reset_to == self.low:
            return f"{ended}; its records [{self.low}, {self.high}) are read, possibly again"
        return f"{ended}; its records [{self.low}, {self.high}) are skipped"


@dataclass(frozen=True)
class _Jump:
    """Queued between chunks when the poller moved a partition without records (a reset):
    ``positions`` follow once the batches fetched before it have been handed out."""

    partition: int
    offset: int


@dataclass
class _CountQuery:
    """A partition-count request for the poller; ``done`` is set once ``count`` is known."""

    done: threading.Event = field(default_factory=threading.Event)
    count: int | None = None


class KafkaSource:
    """Batches of this rank's records. Call :meth:`start`, then :meth:`next_batch` until it
    returns None (bounded and done); :meth:`close` stops the poller.

    ``next_batch`` returns an empty batch (equal to []) when nothing arrived within
    ``max_wait_s``, so a rank with empty partitions keeps stepping with the others instead of
    blocking. Batches are RecordChunks: sequences of KafkaRecord whose columns the codec reads
    without per-record work. Memory stays bounded by ``queue_records`` however much the topic
    holds. ``positions`` are the next offsets of the records handed out so far (what a
    checkpoint stores); a partition adopted by :meth:`add_partitions` appears there once
    records from it (or a reset) were handed out: a resume reads a partition it lacks from the
    earliest offset, which is where an adopted partition starts anyway.

    ``resume_offsets``: None for a new job (positions from ``spec.start``); a mapping, possibly
    empty, when resuming from a checkpoint: listed partitions continue at their offset, the
    others (added since) start at their earliest offset whatever ``spec.start`` says. A resumed
    offset outside the broker's range raises OffsetOutOfRangeError at :meth:`start`, or resets
    per ``spec.offset_reset`` (each reset is in ``offset_resets``), as does one refused later.
    """

    def __init__(self, spec: SourceSpec, *, rank: int = 0, world_size: int = 1, group_id: str = "cicw",
                 resume_offsets: Mapping[int, int] | None = None,
                 client_factory: Callable[[], PartitionClient] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self._resume = None if resume_offsets is None else dict(resume_offsets)
        self._factory = client_factory or (lambda: make_client(spec.client, spec.bootstrap_servers,
                                                               group_id, spec.client_config,
                                                               timeout_s=spec.metadata_timeout_s))
        # Whole fetched chunks travel through the queue (one put/get per fetch, not per record);
        # its bound in chunks keeps about queue_records records buffered at most.
        self._queue: queue.Queue[RecordChunk | _Jump] = queue.Queue(
            maxsize=max(1, spec.queue_records // spec.fetch_records))
        # The chunk a batch was last cut from, and where its unused records start: batches are
        # sliced off it in place rather than copying the remainder at every cut.
        self._carry = RecordChunk.empty(spec.topic)
        self._carry_at = 0
        self._held_jump: _Jump | None = None  # dequeued after records: applied with the next batch
        self._stop = threading.Event()
        self._poller_done = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.partitions: list[int] = []  # replaced (never mutated) by the poller when it adopts
        self.partition_count = 0  # the topic's partitions known so far (start, then add_partitions)
        self.positions: dict[int, int] = {}
        self.end_offsets: dict[int, int] = {}
        self.offset_resets: list[OffsetReset] = []
        self._start_positions: dict[int, int] = {}  # poller thread only, once started
        self._fetched: dict[int, int] = {}  # poller thread only
        # Bounded jobs: the poller reached every partition's end (it idles, still serving
        # requests); once next_batch returned None the source is finished and adopts nothing.
        # The lock orders that decision against add_partitions.
        self._at_end = threading.Event()
        self._finished = False
        self._lock = threading.Lock()
        self._to_adopt: list[int] = []  # under _lock; the poller adopts them before its next fetch
        self._queries: queue.Queue[_CountQuery] = queue.Queue()
        self._wake = threading.Event()
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

    def start(self) -> KafkaSource:
        """Find this rank's partitions and positions, then start the poller. Raises
        SourceClientError when the topic cannot be read, OffsetOutOfRangeError for a resumed
        offset the broker no longer has (policy 'fail')."""
        client = self._factory()
        try:
            spec = self.spec
            topic_partitions = client.partitions(spec.topic, spec.metadata_timeout_s)
            self.partition_count = len(topic_partitions)
            self.partitions = assigned_partitions(topic_partitions, self.rank, self.world_size)
            self.positions = self._initial_positions(client)
            self._start_positions = dict(self.positions)
            if spec.stop_at == "end":
                self.end_offsets = self._end_offsets(client)
            if self.partitions:
                client.assign(spec.topic, self.positions)
            elif spec.stop_at == "end":  # nothing to read unless partitions are adopted later
                self._at_end.set()
        except BaseException:
            client.close()
            raise
        self._thread = threading.Thread(target=self._poll_loop, args=(client,), name="kafka-poller", daemon=True)
        self._thread.start()
        return self

    def _initial_positions(self, client: PartitionClient) -> dict[int, int]:
        if self._resume is not None:  # the checkpoint, not the group, is the source of truth
            return self._resumed_positions(client, self._resume)
        spec, out = self.spec, {}
        timeout = spec.metadata_timeout_s
        if isinstance(spec.start, StartAtTimestamp):
            by_time = client.offsets_for_time(spec.topic, self.partitions, spec.start.timestamp_ms, timeout)
        for p in self.partitions:
            if isinstance(spec.start, StartAtOffsets) and p in spec.start.offsets:
                out[p] = spec.start.offsets[p]
            elif isinstance(spec.start, StartAtTimestamp):
                out[p] = by_time[p]
                self._skip_before_ms[p] = spec.start.timestamp_ms
            else:
                low, high = client.watermarks(spec.topic, p, timeout)
                out[p] = high if spec.start == "latest" else low
        return out

    def _resumed_positions(self, client: PartitionClient, resume: dict[int, int]) -> dict[int, int]:
        """The checkpoint's offsets, checked against the broker's range; partitions it lacks
        were added since it was written, so all their records are new to the job."""
        spec = self.spec
        gone = sorted(p for p in resume if p >= self.partition_count and p % self.world_size == self.rank)
        if gone:
            log.warning("%s: checkpoint partitions %s no longer exist (the topic has %d)", spec.topic, gone,
                        self.partition_count)
        ranges = {p: client.watermarks(spec.topic, p, spec.metadata_timeout_s) for p in self.partitions}
        out = {p: resume.get(p, low) for p, (low, _) in ranges.items()}
        added = [p for p in self.partitions if p not in resume]
        if added:
            log.info("%s: partitions %s are not in the checkpoint: read from their earliest offsets", spec.topic,
                     added)
        beyond = {p: high for p, (low, high) in ranges.items() if out[p] > high > low}
        for p, end in self._true_ends(client, beyond).items():
            ranges[p] = (ranges[p][0], end)
        for p, (low, high) in ranges.items():
            if not low <= out[p] <= high:
                out[p] = self._out_of_range(p, out[p], low, high, "resume")
        return out

    def _end_offsets(self, client: PartitionClient) -> dict[int, int]:
        """Each partition's end now, for ``stop_at: end``. Where the start position is at or past
        the reported high watermark, the true end is read (see :meth:`_true_ends`): on the embedded
        broker the watermark can trail the end, and the first empty fetch would then end a
        resumed job before it read a record."""
        timeout = self.spec.metadata_timeout_s
        ranges = {p: client.watermarks(self.spec.topic, p, timeout) for p in self.partitions}
        ends = {p: high for p, (_, high) in ranges.items()}
        ends.update(self._true_ends(client, {p: high for p, (low, high) in ranges.items()
                                             if self.positions[p] >= high > low}))
        return ends

    def _true_ends(self, client: PartitionClient, highs: dict[int, int]) -> dict[int, int]:
        """End offsets of these partitions, by reading the batch at each one's high watermark - 1.

        The embedded broker (Tansu 0.6) reports the high watermark as the last batch's base
        offset + 1, below the true end when that batch holds several records: an offset the job
        legitimately reached would look out of range. Kafka's watermark is exact, and this only
        confirms it (it runs only for offsets beyond the watermark: an error on Kafka).
        """
        ends = dict(highs)
        if not highs:
            return ends
        client.assign(self.spec.topic, {p: high - 1 for p, high in highs.items()})
        seen: set[int] = set()
        deadline = time.monotonic() + self.spec.metadata_timeout_s
        while time.monotonic() < deadline:
            chunk = client.poll(self.spec.fetch_records, 0.1)
            if not chunk and seen == set(highs):
                break
            for p, last in chunk.last_offsets().items():
                ends[p] = max(ends[p], last + 1)
                seen.add(p)
        return ends

    def _out_of_range(self, partition: int, offset: int, low: int, high: int,
                      when: Literal["resume", "fetch"]) -> int:
        """Where to continue from an offset outside [low, high], per ``offset_reset``; raises
        OffsetOutOfRangeError when the policy is 'fail'."""
        policy, where = self.spec.offset_reset, f"{self.spec.topic}[{partition}]"
        what = "resumed" if when == "resume" else "fetch"
        if policy == "fail":
            raise OffsetOutOfRangeError(
                f"{where}: {what} offset {offset} is outside the broker's range [{low}, {high}] (retention "
                "deleted it, or the topic was recreated); set source.offset_reset to 'earliest' or 'latest' "
                "to continue from that end")
        reset = OffsetReset(partition, offset, low, high, low if policy == "earliest" else high, when)
        self.offset_resets.append(reset)
        log.warning("%s: %s offset %d is outside the broker's range [%d, %d]; offset_reset=%s: continuing at %d "
                    "(%s)", where, what, offset, low, high, policy, reset.reset_to, reset.consequence())
        return reset.reset_to

    def topic_partition_count(self) -> int | None:
        """The topic's partition count per fresh metadata; None when the broker did not answer in
        time (the caller tries again later). Any thread: the poller asks, between fetches."""
        if self._thread is None or self._poller_done.is_set():
            return None
        query = _CountQuery()
        self._queries.put(query)
        self._wake.set()
        # The poller may be in a fetch (0.1 s) before it gets to the query.
        if not query.done.wait(min(self.spec.metadata_timeout_s, PARTITION_COUNT_TIMEOUT_S) + 1.0):
            return None
        return query.count

    def add_partitions(self, count: int) -> list[int]:
        """Adopt this rank's partitions (p mod W) among [``partition_count``, ``count``), each read
        from its earliest offset; returns them. Call it with the same ``count`` on every rank
        (the max of their :meth:`topic_partition_count`, agreed at a checkpoint boundary).

        Any thread: the poller adopts them before its next fetch (assigning every partition at
        its fetch position); a bounded job takes their end offsets then. A bounded source that
        already returned None from next_batch is finished and adopts nothing (logged).
        """
        if self._thread is None:
            raise RuntimeError("add_partitions needs a started source")
        with self._lock:
            if count <= self.partition_count:
                return []
            new = assigned_partitions(list(range(self.partition_count, count)), self.rank, self.world_size)
            self.partition_count = count
            if self._finished:
                if new:
                    log.warning("%s: partitions %s appeared after this bounded source finished; not read",
                                self.spec.topic, new)
                return []
            self._to_adopt.extend(new)
        if new:
            self._wake.set()
        return new

    def _poll_loop(self, client: PartitionClient) -> None:
        try:
            last_check = self._clock()
            while not self._stop.is_set():
                self._serve_requests(client)
                if not self.partitions or self._at_end.is_set():  # idle until asked for something
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                records = self._fetch(client)
                got_any = bool(records)
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
                    if records:
                        self._put(records, client)
                # The broker's high watermark can trail the true end, so reaching the snapshot
                # alone is not "consumed everything": also require a fetch that returned nothing.
                if not got_any and self.spec.stop_at == "end" and self._reached_end(client):
                    self._at_end.set()
        except BaseException as exc:  # surfaced to the train loop by next_batch
            self._error = exc
        finally:
            client.close()
            self._poller_done.set()

    def _fetch(self, client: PartitionClient) -> RecordChunk:
        try:
            return client.poll(self.spec.fetch_records, 0.1)
        except FetchOutOfRange as exc:
            self._reset_refused(client, exc)
        except TransientClientError as exc:  # the client reconnects; the deadline bounds the wait
            self._trouble = str(exc)
        return RecordChunk.empty(self.spec.topic)

    def _put(self, item: RecordChunk | _Jump, client: PartitionClient) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)  # blocks when full: bounded memory
                return
            except queue.Full:
                self._serve_requests(client)  # a slow reader must not hold up adoption or queries

    def _serve_requests(self, client: PartitionClient) -> None:
        """Answer partition-count queries and adopt requested partitions (poller thread)."""
        while True:
            try:
                query = self._queries.get_nowait()
            except queue.Empty:
                break
            query.count = self._partition_count(client)
            query.done.set()
        with self._lock:
            todo = list(self._to_adopt)
        if todo:
            self._adopt(client, todo)

    def _partition_count(self, client: PartitionClient) -> int | None:
        try:
            return len(client.partitions(self.spec.topic,
                                         min(self.spec.metadata_timeout_s, PARTITION_COUNT_TIMEOUT_S)))
        except SourceClientError as exc:
            log.info("%s: partition count unknown for now: %s", self.spec.topic, exc)
            return None

    def _adopt(self, client: PartitionClient, todo: list[int]) -> None:
        """Start reading these partitions from their earliest offsets (poller thread)."""
        spec = self.spec
        try:
            ranges = {p: client.watermarks(spec.topic, p, spec.metadata_timeout_s) for p in todo}
        except TransientClientError as exc:  # tried again before the next fetch
            self._trouble = str(exc)
            return
        positions = self._fetch_positions(client)
        positions.update({p: low for p, (low, _) in ranges.items()})
        client.assign(spec.topic, positions)
        self._start_positions.update({p: low for p, (low, _) in ranges.items()})
        if spec.stop_at == "end":
            self.end_offsets = {**self.end_offsets, **{p: high for p, (_, high) in ranges.items()}}
        self.partitions = sorted({*self.partitions, *todo})
        # Cleared before the request leaves _to_adopt: next_batch never sees "at end, nothing
        # pending" while adopted partitions are unread.
        self._at_end.clear()
        with self._lock:
            self._to_adopt = [p for p in self._to_adopt if p not in ranges]
        log.info("%s: adopted partitions %s from offsets %s", spec.topic, todo,
                 {p: low for p, (low, _) in ranges.items()})

    def _reset_refused(self, client: PartitionClient, refused: FetchOutOfRange) -> None:
        """The broker refused positions it no longer has: fail, or continue per ``offset_reset``."""
        spec, moved = self.spec, {}
        if not refused.offsets:
            raise OffsetOutOfRangeError(f"{spec.topic}: {refused}") from refused
        for p, offset in refused.offsets.items():
            if p not in self.partitions:  # a stale answer for a partition no longer assigned
                continue
            try:
                low, high = client.watermarks(spec.topic, p, spec.metadata_timeout_s)
            except TransientClientError as exc:
                raise OffsetOutOfRangeError(f"{spec.topic}[{p}]: fetch offset {offset} refused as out of range; "
                                            f"the broker's range is unknown ({exc})") from refused
            moved[p] = self._out_of_range(p, offset, low, high, "fetch")
        positions = self._fetch_positions(client)
        positions.update(moved)  # not the max: a recreated topic moves a partition back
        client.assign(spec.topic, positions)
        for p, offset in moved.items():
            self._fetched[p] = offset
            self._put(_Jump(p, offset), client)

    def _fetch_position(self, client: PartitionClient, partition: int) -> int:
        """Where the consumer reads this partition next: past the last record fetched, and past
        transaction markers, which only the client's position reflects."""
        known = self._fetched.get(partition, self._start_positions[partition])
        position = client.position(self.spec.topic, partition)
        return known if position is None else max(known, position)

    def _fetch_positions(self, client: PartitionClient) -> dict[int, int]:
        return {p: self._fetch_position(client, p) for p in self.partitions}

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
        return sum(self.lag_by_partition().values())

    def lag_by_partition(self) -> dict[int, int]:
        """:meth:`lag` per partition of this rank whose end offset is known."""
        return {p: max(high - self.positions.get(p, self._start_positions.get(p, high)), 0)
                for p, high in list(self._high.items())}

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

    def _reached_end(self, client: PartitionClient) -> bool:
        return all(self._fetch_position(client, p) >= self.end_offsets[p] for p in self.partitions)

    def next_batch(self) -> RecordChunk | None:
        """Up to ``batch_size`` records, waiting at most ``max_wait_s``; None once bounded and done.

        The batch is cut from whole fetched chunks without touching single records, and
        ``positions`` move to one past each partition's last record in it. Raises the poller's
        failure: OffsetOutOfRangeError for a refused position (policy 'fail'), else
        SourceClientError.
        """
        self._raise_poller_error()
        if self._held_jump is not None:
            self._apply_jump(self._held_jump)
            self._held_jump = None
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
                item = (self._queue.get(timeout=max(remaining, 0.0)) if remaining > 0
                        else self._queue.get_nowait())
            except queue.Empty:
                if self._drained():
                    self._raise_poller_error()
                    if not have and self.spec.stop_at == "end" and self._finish():
                        self._advance_positions(RecordChunk.empty(self.spec.topic))
                        return None
                    if not have and self._poller_done.is_set():  # closed: keep the caller's pace
                        time.sleep(max(deadline - time.monotonic(), 0.0))
                        return RecordChunk.empty(self.spec.topic)
                    break
                if remaining <= 0:
                    break
                continue
            if isinstance(item, _Jump):
                if have:  # the records before it are handed out with their own positions first
                    self._held_jump = item
                    break
                self._apply_jump(item)
                continue
            take = size - have
            pieces.append(item[:take] if take < len(item) else item)
            have += len(pieces[-1])
            self._carry, self._carry_at = item, len(pieces[-1])
        batch = RecordChunk.concat(pieces, self.spec.topic)
        self._advance_positions(batch)
        return batch

    def batch_ready(self) -> bool:
        """Whether :meth:`next_batch` can cut a whole batch now, without waiting: the chunk it
        cuts from still holds ``batch_size`` records (taker's thread, as next_batch)."""
        return self._held_jump is None and len(self._carry) - self._carry_at >= self.spec.batch_size

    def _raise_poller_error(self) -> None:
        error = self._error
        if error is None:
            return
        kind = OffsetOutOfRangeError if isinstance(error, OffsetOutOfRangeError) else SourceClientError
        raise kind(f"kafka poller failed: {error}") from error

    def _drained(self) -> bool:
        """No more records will come (poller stopped, or bounded and at its end) and all were taken."""
        return ((self._poller_done.is_set() or self._at_end.is_set()) and self._queue.empty()
                and self._carry_at >= len(self._carry))

    def _finish(self) -> bool:
        """Whether a bounded source is done; from then on it adopts no partitions."""
        with self._lock:
            if not self._poller_done.is_set() and (self._to_adopt or not self._at_end.is_set()):
                return False
            self._finished = True
            return True

    def _apply_jump(self, jump: _Jump) -> None:
        self.positions[jump.partition] = jump.offset

    def _advance_positions(self, batch: RecordChunk) -> None:
        # Skipped records precede every record handed out from their partition, so the larger
        # of the two next offsets is the right one.
        for p, offset in list(self._skipped_to.items()):
            self.positions[p] = max(self.positions[p], offset)
        # One past each partition's last record in the batch, as handing them out one by one would.
        self.positions.update({p: o + 1 for p, o in batch.last_offsets().items()})

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> KafkaSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
