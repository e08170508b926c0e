"""Several files in one multipart upload, as the JS SDK's `files.write([...])` sends them: one
body, each part named `file` with the target path as its file name, no `path` query parameter.
As with envd, missing directories are made and given to the uploading user, also where the user
could not make them (`/0/...` as `user`)."""

import random

from e2b.sandbox.filesystem.filesystem import WriteEntry


def _undici_form(files):
    """The body and content type Node's FormData (undici) produces for `append('file', blob, path)`."""
    boundary = "----formdata-undici-0%011d" % random.randrange(10**11)
    body = b""
    for path, data in files:
        body += (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{path}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_js_sdk_multipart_body_with_several_files(sandbox):
    files = []
    for i in range(6):
        path = f"/{i}/multi_test_file{i}.txt" if i % 2 == 0 else f"/home/user/multi_test_file{i}.txt"
        files.append((path, f"This is a test file {i}.".encode()))
    files.append(("relative/one.txt", b"relative"))
    body, content_type = _undici_form(files)
    r = sandbox._envd_api.post("/files", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text
    infos = r.json()
    expected = [p if p.startswith("/") else f"/home/user/{p}" for p, _ in files]
    assert [i["path"] for i in infos] == expected
    assert [i["name"] for i in infos] == [p.rsplit("/", 1)[1] for p in expected]
    for path, (_, data) in zip(expected, files):
        assert sandbox.files.read(path, format="bytes") == data
    # The directory made at the root for the user belongs to the user, and so does the file.
    owners = sandbox.commands.run("stat -c %U /0 /0/multi_test_file0.txt").stdout.split()
    assert owners == ["user", "user"]


def test_sdk_write_files_into_directories_only_root_could_make(sandbox):
    infos = sandbox.files.write_files(
        [WriteEntry(path="/srv-data/a/one.txt", data="1"), WriteEntry(path="/srv-data/b/two.txt", data="2")]
    )
    assert [i.path for i in infos] == ["/srv-data/a/one.txt", "/srv-data/b/two.txt"]
    assert sandbox.files.read("/srv-data/b/two.txt") == "2"
    # Existing files of other users stay protected: the file itself is written as the user.
    r = sandbox._envd_api.post(
        "/files",
        params={"path": "/etc/hostname"},
        content=b"x",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 403, r.text
