"""Internet access through the SDK: on by default, off with `allow_internet_access=False`."""

from e2b import Sandbox

FETCH = "curl -sS -m 30 -o /dev/null -w %{http_code} http://deb.debian.org/debian/dists/bookworm/Release || echo unreachable"


def test_internet_access_on_and_off():
    online = Sandbox.create(timeout=300)
    offline = Sandbox.create(timeout=300, allow_internet_access=False)
    try:
        assert online.commands.run(FETCH).stdout == "200"
        assert "unreachable" in offline.commands.run(FETCH.replace("-m 30", "-m 5")).stdout
        assert offline.commands.run("echo works").stdout == "works\n"
    finally:
        online.kill()
        offline.kill()


def test_pip_installs_from_pypi(sandbox):
    result = sandbox.commands.run("pip install -q six && python3 -c 'import six; print(six.__name__)'", timeout=180)
    assert result.stdout.strip().endswith("six")
