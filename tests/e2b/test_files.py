"""Files through the SDK: text and bytes, 10 MiB, several at once, listing with depth, info,
directories, removal and renames."""

import os

import pytest
from e2b.exceptions import NotFoundException


def test_text_and_bytes_round_trip(sandbox):
    info = sandbox.files.write("/home/user/hello.txt", "héllo\n")
    assert info.path == "/home/user/hello.txt"
    assert sandbox.files.read("/home/user/hello.txt") == "héllo\n"
    blob = bytes(range(256)) * 4
    sandbox.files.write("/home/user/blob.bin", blob)
    assert sandbox.files.read("/home/user/blob.bin", format="bytes") == blob
    assert sandbox.commands.run("stat -c %U /home/user/blob.bin").stdout == "user\n"


def test_ten_mebibytes_round_trip(sandbox):
    data = os.urandom(10 << 20)
    sandbox.files.write("/tmp/big.bin", data)
    assert sandbox.files.read("/tmp/big.bin", format="bytes") == data


def test_write_files_list_with_depth_exists_and_get_info(sandbox):
    from e2b.sandbox.filesystem.filesystem import WriteEntry

    sandbox.files.write_files(
        [
            WriteEntry(path="/home/user/tree/a.txt", data="a"),
            WriteEntry(path="/home/user/tree/sub/b.txt", data="bb"),
        ]
    )
    top = {e.name for e in sandbox.files.list("/home/user/tree")}
    assert top == {"a.txt", "sub"}
    deep = {e.path for e in sandbox.files.list("/home/user/tree", depth=2)}
    assert "/home/user/tree/sub/b.txt" in deep
    assert sandbox.files.exists("/home/user/tree/sub/b.txt")
    assert not sandbox.files.exists("/home/user/tree/nope")
    info = sandbox.files.get_info("/home/user/tree/sub/b.txt")
    assert info.size == 2 and info.type.value == "file"


def test_make_dir_rename_and_remove(sandbox):
    assert sandbox.files.make_dir("/home/user/new/nested")
    assert not sandbox.files.make_dir("/home/user/new/nested"), "existing directories report False"
    sandbox.files.write("/home/user/new/nested/f.txt", "x")
    moved = sandbox.files.rename("/home/user/new/nested/f.txt", "/home/user/new/g.txt")
    assert moved.path == "/home/user/new/g.txt"
    assert sandbox.files.read("/home/user/new/g.txt") == "x"
    sandbox.files.remove("/home/user/new")
    assert not sandbox.files.exists("/home/user/new")
    with pytest.raises(NotFoundException):
        sandbox.files.read("/home/user/new/g.txt")


def test_files_as_root_and_permission_errors(sandbox):
    sandbox.files.write("/root/secret.txt", "s", user="root")
    assert sandbox.files.read("/root/secret.txt", user="root") == "s"
    with pytest.raises(Exception):
        sandbox.files.read("/root/secret.txt")


def test_streamed_and_gzip_uploads(sandbox):
    import io

    data = os.urandom(3 << 20)
    sandbox.files.write("/tmp/from-file-object.bin", io.BytesIO(data))
    assert sandbox.files.read("/tmp/from-file-object.bin", format="bytes") == data
    sandbox.files.write("/tmp/gzipped.txt", "compressible " * 10000, gzip=True)
    assert sandbox.files.read("/tmp/gzipped.txt") == "compressible " * 10000
    sandbox.files.write("/tmp/chunks.bin", iter([b"a" * 1000, b"b" * 1000]))
    assert sandbox.files.read("/tmp/chunks.bin", format="bytes") == b"a" * 1000 + b"b" * 1000
