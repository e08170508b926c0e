"""Snapshots and metrics as E2B's API has them: snapshots named `NAME:default` (`ID:default`
without a name), listed by name and by page, deleted through the SDK (True, then False once
gone); metrics over a time range return the samples taken in that range."""

import datetime
import time

from e2b import Sandbox


def test_snapshots_named_listed_by_name_paged_and_deleted(sandbox):
    name = f"api-snap-{time.time_ns()}"
    named = sandbox.create_snapshot(name=name)
    assert named.snapshot_id == f"{name}:default"
    assert named.names == [f"{name}:default"]
    unnamed = sandbox.create_snapshot()
    assert unnamed.snapshot_id.endswith(":default") and unnamed.names == []

    by_name = Sandbox.list_snapshots(name=name).next_items()
    assert [s.snapshot_id for s in by_name] == [named.snapshot_id]
    assert Sandbox.list_snapshots(name=f"{name}-does-not-exist").next_items() == []

    # Pages of one walk every snapshot of the sandbox once.
    paginator = Sandbox.list_snapshots(sandbox_id=sandbox.sandbox_id, limit=1)
    seen = []
    while paginator.has_next:
        seen += [s.snapshot_id for s in paginator.next_items()]
    assert sorted(seen) == sorted([named.snapshot_id, unnamed.snapshot_id])

    # A sandbox starts from the snapshot's E2B name.
    child = Sandbox.create(named.snapshot_id, timeout=300)
    child.kill()

    assert Sandbox.delete_snapshot(unnamed.snapshot_id) is True
    assert Sandbox.delete_snapshot(unnamed.snapshot_id) is False
    assert Sandbox.delete_snapshot(named.snapshot_id) is True
    assert Sandbox.delete_snapshot(named.snapshot_id) is False
    assert Sandbox.list_snapshots(name=name).next_items() == []


def test_metrics_over_a_time_range_return_the_samples_in_it(sandbox):
    # The server samples every sandbox's metrics on its own; wait for a few samples.
    # (Each request records a sample too, so several may share a second: wait for samples in
    # at least two different seconds.)
    deadline = time.monotonic() + 120
    while True:
        history = sandbox.get_metrics()
        seconds = {m.timestamp.replace(microsecond=0) for m in history}
        if len(history) >= 3 and len(seconds) >= 2:
            break
        assert time.monotonic() < deadline, f"no history of samples: {history}"
        time.sleep(1)
    stamps = [m.timestamp for m in history]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == len(stamps)
    # A range that holds only the first second's samples (whole seconds, as the SDK sends them).
    second = stamps[0].replace(microsecond=0)
    ranged = sandbox.get_metrics(start=second, end=second)
    assert ranged, "a range holding a sample returns it"
    assert all(second <= m.timestamp.replace(microsecond=0) <= second for m in ranged)
    assert len(ranged) < len(history)
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    assert sandbox.get_metrics(start=later) == []


def test_metrics_of_a_paused_sandbox_are_its_history_up_to_the_pause():
    sbx = Sandbox.create(timeout=300)
    try:
        before = sbx.get_metrics()
        assert before, "a running sandbox has at least the sample the request took"
        sbx.pause()
        # Past the server's next sampling sweep (every 5 s), which once dropped the history of
        # every sandbox not running.
        time.sleep(6)
        # No agent to ask while paused: the samples taken before the pause, and no error.
        during = sbx.get_metrics()
        assert [m.timestamp for m in during][: len(before)] == [m.timestamp for m in before]
        assert during[-1].timestamp <= datetime.datetime.now(datetime.timezone.utc)
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"
    finally:
        sbx.kill()
