"""DecodedBatches: batches decoded ahead carry the positions they end at (what a checkpoint stores)."""

from __future__ import annotations

import time

import pytest

from workers.kafka.prefetch import DecodedBatches
from workers.kafka.records import CodecSpec, KafkaRecord, RawFormat


class ScriptedSource:
    """A source whose next_batch hands out a fixed script, advancing positions like KafkaSource."""

    def __init__(self, script: list[list[KafkaRecord] | Exception | None]) -> None:
        self.script = list(script)
        self.positions = {0: 0}
        self.calls = 0

    def next_batch(self) -> list[KafkaRecord] | None:
        self.calls += 1
        item = self.script.pop(0) if self.script else []
        if isinstance(item, Exception):
            raise item
        for rec in item or []:
            self.positions[rec.partition] = rec.offset + 1
        return item

    def batch_ready(self) -> bool:
        return False  # as a source waiting for its next fetch: one batch per wake-up


def _recs(offsets: range) -> list[KafkaRecord]:
    return [KafkaRecord("t", 0, o, bytes([o % 256]), headers=(("label", b"1"),)) for o in offsets]


CODEC = CodecSpec(format=RawFormat(dtype="uint8"), input_shape=(1,), num_classes=3)


def _wait_until(condition) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_positions_follow_the_batches_taken_not_those_decoded_ahead() -> None:
    source = ScriptedSource([_recs(range(0, 4)), _recs(range(4, 8)), [], _recs(range(8, 9)), None])
    batches = DecodedBatches(source, CODEC, depth=1)  # type: ignore[arg-type]
    try:
        first = batches.next()
        assert first is not None and first.decoded.inputs.flatten().tolist() == [0, 1, 2, 3]
        _wait_until(lambda: source.positions[0] == 8)  # the second batch is decoded ahead...
        assert batches.positions == {0: 4}  # ...but a checkpoint now still says 4
        assert [len(b.records) for b in iter(batches.next, None)] == [4, 0, 1]
        assert batches.positions == {0: 9} and batches.next() is None
    finally:
        batches.close()


def test_source_errors_reach_the_loop_and_close_drops_what_was_not_taken() -> None:
    batches = DecodedBatches(ScriptedSource([_recs(range(2)), RuntimeError("broker said no")]), CODEC)  # type: ignore[arg-type]
    assert batches.next() is not None
    with pytest.raises(RuntimeError, match="broker said no"):
        batches.next()
    assert batches.next() is None
    batches.close()

    endless = ScriptedSource([_recs(range(i, i + 1)) for i in range(100)])
    ahead = DecodedBatches(endless, CODEC, depth=2)  # type: ignore[arg-type]
    _wait_until(lambda: endless.calls >= 3)
    ahead.close()  # returns although the queue is full
    assert ahead.positions == {0: 0} and endless.calls <= 4  # bounded read-ahead; nothing taken


class BufferedSource(ScriptedSource):
    """A source holding whole batches while ``ready`` says so (what is left of a fetched chunk)."""

    def __init__(self, script: list[list[KafkaRecord] | Exception | None], ready: int) -> None:
        super().__init__(script)
        self.ready = ready

    def batch_ready(self) -> bool:
        return self.calls < self.ready


def test_a_group_decoded_in_one_wake_up_hands_out_its_batches_with_their_own_positions() -> None:
    script: list[list[KafkaRecord] | Exception | None] = [_recs(range(i, i + 2)) for i in range(0, 10, 2)]
    source = BufferedSource([*script, RuntimeError("broker said no")], ready=10)
    batches = DecodedBatches(source, CODEC, depth=1, group=3)  # type: ignore[arg-type]
    try:
        first = batches.next()
        assert first is not None and batches.positions == {0: 2}
        _wait_until(lambda: source.calls == 6)  # groups [0, 2, 4] taken, [6, 8, error] queued
        assert batches.positions == {0: 2}  # batches decoded ahead never move the positions
        taken = [batches.next() for _ in range(4)]
        assert [b.positions for b in taken if b is not None] == [{0: 4}, {0: 6}, {0: 8}, {0: 10}]
        with pytest.raises(RuntimeError, match="broker said no"):  # after the batches fetched before it
            batches.next()
        assert batches.positions == {0: 10} and batches.next() is None
    finally:
        batches.close()
