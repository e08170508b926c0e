"""Directory watchers through the SDK: the polling watcher of the sync SDK and the event stream
(`WatchDir`) of the async one."""

import asyncio
import time

from e2b import AsyncSandbox


def _events(handle):
    return [(e.name, e.type.name) for e in handle.get_new_events()]


def test_watch_dir_reports_creates_writes_renames_removes_and_chmods(sandbox):
    sandbox.files.make_dir("/home/user/w")
    handle = sandbox.files.watch_dir("/home/user/w", recursive=True)
    sandbox.files.write("/home/user/w/a.txt", "1")
    sandbox.commands.run(
        "mkdir /home/user/w/sub && sleep 0.2 && echo x > /home/user/w/sub/b.txt"
        " && mv /home/user/w/a.txt /home/user/w/c.txt && rm /home/user/w/c.txt"
        " && chmod 600 /home/user/w/sub/b.txt"
    )
    time.sleep(0.5)
    events = _events(handle)
    for expected in [
        ("a.txt", "CREATE"),
        ("a.txt", "WRITE"),
        ("sub", "CREATE"),
        ("sub/b.txt", "CREATE"),
        ("sub/b.txt", "WRITE"),
        ("a.txt", "RENAME"),
        ("c.txt", "CREATE"),
        ("c.txt", "REMOVE"),
        ("sub/b.txt", "CHMOD"),
    ]:
        assert expected in events, f"{expected} missing from {events}"
    assert _events(handle) == [], "events are delivered once"
    handle.stop()


def test_watch_dir_without_recursion_ignores_subdirectories(sandbox):
    sandbox.commands.run("mkdir -p /home/user/flat/deep")
    handle = sandbox.files.watch_dir("/home/user/flat")
    sandbox.commands.run("touch /home/user/flat/deep/x /home/user/flat/top")
    time.sleep(0.5)
    names = [name for name, _ in _events(handle)]
    assert "top" in names and "deep/x" not in names
    handle.stop()


def test_async_watch_dir_streams_events():
    async def scenario():
        sbx = await AsyncSandbox.create(timeout=300)
        try:
            seen = []
            await sbx.files.make_dir("/home/user/stream")
            handle = await sbx.files.watch_dir("/home/user/stream", on_event=lambda e: seen.append(e.name))
            await sbx.files.write("/home/user/stream/one.txt", "1")
            for _ in range(50):
                if "one.txt" in seen:
                    break
                await asyncio.sleep(0.1)
            await handle.stop()
            assert "one.txt" in seen
        finally:
            await sbx.kill()

    asyncio.run(scenario())
