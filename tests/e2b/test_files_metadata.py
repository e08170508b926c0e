"""File metadata through the SDK (envd 0.6.2): `metadata=` on upload is stored with the file as
`user.e2b.*` extended attributes and shown by write, get_info, list and rename; an overwrite
clears it; attributes set inside the guest show up; bad keys or values are refused."""

import pytest
from e2b.exceptions import InvalidArgumentException
from e2b.sandbox.filesystem.filesystem import WriteEntry


def test_metadata_is_stored_and_shown_by_write_get_info_list_and_rename(sandbox):
    metadata = {"author": "mish", "purpose": "upload"}
    info = sandbox.files.write("/home/user/meta/a.txt", "content", metadata=metadata)
    assert info.metadata == metadata
    assert sandbox.files.get_info("/home/user/meta/a.txt").metadata == metadata
    listed = {e.name: e.metadata for e in sandbox.files.list("/home/user/meta")}
    assert listed == {"a.txt": metadata}
    renamed = sandbox.files.rename("/home/user/meta/a.txt", "/home/user/meta/b.txt")
    assert renamed.metadata == metadata
    # Stored as extended attributes, under the user.e2b. namespace.
    out = sandbox.commands.run(
        "python3 -c 'import os; print(os.getxattr(\"/home/user/meta/b.txt\", \"user.e2b.author\").decode())'"
    )
    assert out.stdout.strip() == "mish"


def test_metadata_with_octet_stream_and_several_files(sandbox):
    info = sandbox.files.write(
        "/home/user/meta2/octet.txt", "x", metadata={"k": "v"}, use_octet_stream=True
    )
    assert info.metadata == {"k": "v"}
    infos = sandbox.files.write_files(
        [WriteEntry(path="/home/user/meta2/1.txt", data="1"), WriteEntry(path="/home/user/meta2/2.txt", data="2")],
        metadata={"source": "test-suite"},
    )
    assert [i.metadata for i in infos] == [{"source": "test-suite"}] * 2
    for i in infos:
        assert sandbox.files.get_info(i.path).metadata == {"source": "test-suite"}


def test_overwrite_clears_metadata_and_files_without_it_have_none(sandbox):
    sandbox.files.write("/home/user/over.txt", "first", metadata={"author": "mish"})
    info = sandbox.files.write("/home/user/over.txt", "second")
    assert info.metadata is None
    assert sandbox.files.get_info("/home/user/over.txt").metadata is None
    assert sandbox.files.read("/home/user/over.txt") == "second"


def test_extended_attributes_set_in_the_guest_show_up(sandbox):
    sandbox.files.write("/home/user/xattr.txt", "content")
    sandbox.commands.run(
        "python3 -c 'import os; os.setxattr(\"/home/user/xattr.txt\", \"user.e2b.author\", b\"mish\");"
        " os.setxattr(\"/home/user/xattr.txt\", \"user.other\", b\"hidden\")'"
    )
    assert sandbox.files.get_info("/home/user/xattr.txt").metadata == {"author": "mish"}


def test_keys_are_lowercased_and_bad_metadata_is_refused(sandbox):
    info = sandbox.files.write("/home/user/case.txt", "x", metadata={"Author": "Mish"})
    assert info.metadata == {"author": "Mish"}
    # The SDK checks what it sends; the agent checks the raw headers (non-ASCII value, too long).
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write("/home/user/bad.txt", "x", metadata={"k": "caf\u00e9"})
    r = sandbox._envd_api.post(
        "/files",
        params={"path": "/home/user/bad.txt"},
        content=b"x",
        headers={"Content-Type": "application/octet-stream", "X-Metadata-k": "v" * 5000},
    )
    assert r.status_code == 400, r.text
    assert "metadata" in r.json()["message"]
    assert not sandbox.files.exists("/home/user/bad.txt"), "a refused upload writes nothing"
