"""Signed file URLs (`download_url` / `upload_url`) on the SDK's single sandbox URL: no sandbox
header, the sandbox is found by the signature; downloads and uploads work without credentials,
with or without an expiry; a wrong, tampered, expired or misused signature is a 401, as envd
answers."""

import urllib.parse

import httpx


def _with(url, **changes):
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query.update(changes)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def test_signed_download_and_upload_urls_work_without_credentials(sandbox):
    assert sandbox._envd_access_token, "SDK sandboxes are secured"
    sandbox.files.write("/home/user/signed/data.txt", "signed content")
    url = sandbox.download_url("/home/user/signed/data.txt")
    assert "signature=v1_" in url
    r = httpx.get(url, timeout=60)
    assert r.status_code == 200, r.text
    assert r.text == "signed content"
    expiring = sandbox.download_url("/home/user/signed/data.txt", use_signature_expiration=300)
    assert "signature_expiration=" in expiring
    assert httpx.get(expiring, timeout=60).text == "signed content"

    upload = sandbox.upload_url("/home/user/signed/up.txt", use_signature_expiration=300)
    r = httpx.post(upload, files={"file": ("up.txt", b"uploaded")}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()[0]["path"] == "/home/user/signed/up.txt"
    assert sandbox.files.read("/home/user/signed/up.txt") == "uploaded"
    as_root = sandbox.upload_url("/root/signed.txt", user="root")
    assert httpx.post(as_root, files={"file": ("x", b"root's")}, timeout=60).status_code == 200
    assert sandbox.commands.run("stat -c %U /root/signed.txt", user="root").stdout.strip() == "root"


def test_bad_signatures_are_refused_with_401(sandbox):
    sandbox.files.write("/home/user/guarded.txt", "secret")
    url = sandbox.download_url("/home/user/guarded.txt", use_signature_expiration=300)
    # Another path, a forged signature, a later expiry than signed: no sandbox's signature.
    for bad in [
        _with(url, path="/etc/shadow"),
        _with(url, signature="v1_" + "A" * 43),
        _with(url, signature_expiration="99999999999"),
    ]:
        r = httpx.get(bad, timeout=60)
        assert r.status_code == 401, (bad, r.status_code, r.text)
        assert "invalid signature" in r.json()["message"]
    expired = sandbox.download_url("/home/user/guarded.txt", use_signature_expiration=-10)
    r = httpx.get(expired, timeout=60)
    assert r.status_code == 401 and "expired" in r.json()["message"], r.text
    # A download URL does not allow an upload.
    r = httpx.post(url, files={"file": ("guarded.txt", b"overwritten")}, timeout=60)
    assert r.status_code == 401, r.text
    assert sandbox.files.read("/home/user/guarded.txt") == "secret"
