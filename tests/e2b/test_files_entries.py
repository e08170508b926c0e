"""Entries as envd describes them (envd 0.6.x): symlinks report the resolved target path, the
target's type and the link flag; removing a path that does not exist succeeds, as envd's
RemoveAll does."""

from e2b import FileType


def test_symlinks_report_their_resolved_target(sandbox):
    sandbox.files.write("/home/user/links/real/a.txt", "a")
    sandbox.commands.run(
        "cd /home/user/links && ln -s real/a.txt to-file && ln -s real to-dir && ln -s nowhere dangling"
        " && ln -s to-file chain"
    )
    to_file = sandbox.files.get_info("/home/user/links/to-file")
    assert to_file.type == FileType.SYMLINK
    assert to_file.symlink_target == "/home/user/links/real/a.txt"
    chain = sandbox.files.get_info("/home/user/links/chain")
    assert chain.symlink_target == "/home/user/links/real/a.txt", "links are resolved to the end"
    to_dir = sandbox.files.get_info("/home/user/links/to-dir")
    assert to_dir.type == FileType.SYMLINK and to_dir.symlink_target == "/home/user/links/real"
    dangling = sandbox.files.get_info("/home/user/links/dangling")
    assert dangling.type == FileType.SYMLINK
    assert dangling.symlink_target == "/home/user/links/dangling", "an unresolvable link names itself"
    listed = {e.name: e for e in sandbox.files.list("/home/user/links")}
    assert listed["to-dir"].symlink_target == "/home/user/links/real"
    assert listed["real"].type == FileType.DIR and listed["real"].symlink_target is None


def test_removing_a_missing_path_succeeds(sandbox):
    sandbox.files.remove("/home/user/never-there")
    sandbox.files.remove("/home/user/no/such/dir/file.txt")
    sandbox.files.write("/home/user/once.txt", "x")
    sandbox.files.remove("/home/user/once.txt")
    sandbox.files.remove("/home/user/once.txt")
    assert not sandbox.files.exists("/home/user/once.txt")
