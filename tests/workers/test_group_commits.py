"""GroupCommitter: commits in its own thread, newest offsets win, failures retried, close bounded."""

from __future__ import annotations

import threading

from workers.kafka.group_commits import GroupCommitter


class FakeClient:
    def __init__(self, fail_first: int = 0, block: threading.Event | None = None) -> None:
        self.commits: list[dict[int, int]] = []
        self.fail_first, self.block = fail_first, block
        self.entered = threading.Event()
        self.closed = False

    def commit_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        assert topic == "t"
        self.entered.set()
        if self.block is not None:
            self.block.wait()
        if self.fail_first > 0:
            self.fail_first -= 1
            raise RuntimeError("coordinator not available")
        self.commits.append(offsets)

    def close(self) -> None:
        self.closed = True


def test_commits_land_and_close_reports_success() -> None:
    client = FakeClient()
    committer = GroupCommitter("t", lambda: client)
    committer.submit({0: 5, 1: 7})
    assert committer.close(timeout_s=5) is True
    assert client.commits[-1] == {0: 5, 1: 7} == committer.committed and client.closed


def test_a_failed_commit_is_retried_and_newer_offsets_supersede_it() -> None:
    client = FakeClient(fail_first=2)
    committer = GroupCommitter("t", lambda: client, retry_s=0.0)
    committer.submit({0: 5})
    assert committer.close(timeout_s=5) is True
    assert client.commits == [{0: 5}] and committer.failures == 2
    assert committer.last_error == "RuntimeError: coordinator not available"

    gate = threading.Event()
    slow = FakeClient(block=gate)
    committer = GroupCommitter("t", lambda: slow)
    committer.submit({0: 1})
    assert slow.entered.wait(5)
    committer.submit({0: 2})
    committer.submit({0: 3})  # replaces {0: 2}, which never went out
    gate.set()
    assert committer.close(timeout_s=5) is True
    assert slow.commits == [{0: 1}, {0: 3}]


def test_close_gives_up_after_its_timeout_while_the_client_is_blocked() -> None:
    gate = threading.Event()
    client = FakeClient(block=gate)
    committer = GroupCommitter("t", lambda: client)
    committer.submit({0: 9})
    assert client.entered.wait(5)
    assert committer.close(timeout_s=0.2) is False  # returns although the commit never ends
    assert committer.committed == {}
    gate.set()
