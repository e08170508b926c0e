"""Fork and snapshots through the SDK: a fork copies files and running processes, a named
snapshot starts new sandboxes and is listed."""

import time

from e2b import Sandbox


def test_fork_copies_files_and_processes_and_diverges(sandbox):
    sandbox.files.write("/home/user/state.txt", "before fork")
    sandbox.commands.run("sleep 600", background=True)
    forks = sandbox.fork(count=2, timeout=300)
    try:
        assert len(forks) == 2
        for fork in forks:
            assert isinstance(fork, Sandbox), fork
            assert fork.sandbox_id != sandbox.sandbox_id
            assert fork.files.read("/home/user/state.txt") == "before fork"
            assert "sleep 600" in fork.commands.run("ps -eo args").stdout
        forks[0].files.write("/home/user/state.txt", "changed in fork 0")
        assert forks[1].files.read("/home/user/state.txt") == "before fork"
        assert sandbox.files.read("/home/user/state.txt") == "before fork"
        assert sandbox.is_running()
    finally:
        for fork in forks:
            if isinstance(fork, Sandbox):
                fork.kill()


def test_named_snapshot_starts_new_sandboxes(sandbox):
    sandbox.files.write("/home/user/data.txt", "snapshotted")
    name = f"suite-{int(time.time() * 1000)}"
    snapshot = sandbox.create_snapshot(name=name)
    assert f"{name}:default" in snapshot.names
    listed = [s.snapshot_id for s in sandbox.list_snapshots().next_items()]
    assert snapshot.snapshot_id in listed
    child = Sandbox.create(template=name, timeout=300)
    try:
        assert child.files.read("/home/user/data.txt") == "snapshotted"
    finally:
        child.kill()
