"""Files whose size says nothing of their bytes (procfs, sysfs) are read whole: E2B's own
filesystem-snapshot test reads the boot id with `files.read`, which came back empty."""

import re


def test_procfs_and_sysfs_files_are_read_whole(sandbox):
    boot_id = sandbox.files.read("/proc/sys/kernel/random/boot_id")
    assert re.fullmatch(r"[0-9a-f-]{36}\n", boot_id), repr(boot_id)
    assert boot_id == sandbox.commands.run("cat /proc/sys/kernel/random/boot_id").stdout
    status = sandbox.files.read("/proc/self/status")
    assert status.startswith("Name:") and "Pid:" in status, status[:200]
    cpus = sandbox.files.read("/sys/devices/system/cpu/online")
    assert cpus.strip() and cpus.endswith("\n"), repr(cpus)


def test_regular_files_keep_their_length(sandbox):
    sandbox.commands.run("head -c 300000 /dev/urandom > /tmp/blob")
    data = sandbox.files.read("/tmp/blob", format="bytes")
    assert len(data) == 300000
    digest = sandbox.commands.run("sha256sum /tmp/blob").stdout.split()[0]
    import hashlib

    assert hashlib.sha256(data).hexdigest() == digest
