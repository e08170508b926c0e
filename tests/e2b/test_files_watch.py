"""Watches with envd 0.6.x options: entry info in events (0.6.3), `allow_network_mounts` (0.6.4),
and recursive watches that report what directories that appear after the watch started hold."""

import time

from e2b import FileType


def _wait_for(handle, wanted, timeout=60):
    """Polls the watcher until every (name, TYPE) in `wanted` arrived; returns all events."""
    events = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        events += handle.get_new_events()
        seen = {(e.name, e.type.name) for e in events}
        if wanted <= seen:
            return events
        time.sleep(0.2)
    raise AssertionError(f"{wanted - {(e.name, e.type.name) for e in events}} missing from {events}")


def test_watch_events_carry_entry_info(sandbox):
    sandbox.files.make_dir("/home/user/we")
    handle = sandbox.files.watch_dir("/home/user/we", include_entry=True)
    sandbox.files.write("/home/user/we/a.txt", "hello", metadata={"tag": "w"})
    events = _wait_for(handle, {("a.txt", "CREATE")})
    sandbox.commands.run("mkdir /home/user/we/d && rm /home/user/we/a.txt")
    events += _wait_for(handle, {("d", "CREATE"), ("a.txt", "REMOVE")})
    created = next(e for e in events if e.name == "a.txt" and e.type.name == "CREATE")
    # The upload is renamed into place complete, so its entry already has size and metadata.
    assert created.entry is not None and created.entry.path == "/home/user/we/a.txt"
    assert created.entry.type == FileType.FILE and created.entry.size == 5
    assert created.entry.metadata == {"tag": "w"}
    d = next(e for e in events if e.name == "d")
    assert d.entry is not None and d.entry.type == FileType.DIR
    removed = next(e for e in events if e.type.name == "REMOVE")
    assert removed.entry is None, "a removed entry has nothing to describe"
    handle.stop()
    plain = sandbox.files.watch_dir("/home/user/we")
    sandbox.files.write("/home/user/we/b.txt", "b")
    events = _wait_for(plain, {("b.txt", "CREATE")})
    assert all(e.entry is None for e in events), "entries only when asked for"
    plain.stop()


def test_allow_network_mounts_is_accepted(sandbox):
    sandbox.files.make_dir("/home/user/wn")
    handle = sandbox.files.watch_dir("/home/user/wn", allow_network_mounts=True)
    sandbox.files.write("/home/user/wn/x.txt", "x")
    _wait_for(handle, {("x.txt", "CREATE")})
    handle.stop()


def test_recursive_watch_reports_what_new_directories_hold(sandbox):
    sandbox.files.make_dir("/home/user/wr")
    handle = sandbox.files.watch_dir("/home/user/wr", recursive=True)
    # A tree that appears at once (moved in, or filled before the watch of a new directory is in
    # place): everything in it is reported as created, as envd's recursive watcher does.
    sandbox.commands.run(
        "mkdir -p /home/user/staging/new/deep && echo x > /home/user/staging/new/deep/f.txt"
        " && echo y > /home/user/staging/new/g.txt && mv /home/user/staging/new /home/user/wr/new"
    )
    _wait_for(
        handle,
        {("new", "CREATE"), ("new/deep", "CREATE"), ("new/deep/f.txt", "CREATE"), ("new/g.txt", "CREATE")},
    )
    # And the new directories are watched from then on.
    sandbox.commands.run("echo z > /home/user/wr/new/deep/later.txt")
    _wait_for(handle, {("new/deep/later.txt", "CREATE")})
    handle.stop()
