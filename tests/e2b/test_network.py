"""Internet access through the SDK: on by default, off with `allow_internet_access=False`, and
(in the isolated network mode, when the suite runs as root) `network` allow/deny rules at create
and `update_network` later."""

import os

import pytest
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


isolated = pytest.mark.skipif(os.geteuid() != 0, reason="egress rules need the isolated network mode (root)")

MIRROR = "curl -sS -m 10 -o /dev/null -w %{http_code} http://deb.debian.org/debian/dists/bookworm/Release"
PYPI = "curl -sS -m 10 -o /dev/null -w %{http_code} https://pypi.org/simple/six/ || true"


@isolated
def test_network_rules_at_create_and_update():
    sbx = Sandbox.create(timeout=300, network={"allow_out": ["deb.debian.org"], "deny_out": ["0.0.0.0/0"]})
    try:
        info = sbx.get_info()
        assert info.network["allow_out"] == ["deb.debian.org"]
        assert sbx.commands.run(MIRROR).stdout == "200"
        mirror_ip = sbx.commands.run("getent hosts deb.debian.org").stdout.split()[0]
        # Refused by name: TLS to pypi.org is closed before it starts, and DNS does not answer.
        assert sbx.commands.run(PYPI).stdout == "000"
        sbx.update_network({"deny_out": ["deb.debian.org"]})
        assert sbx.commands.run(PYPI).stdout == "200"
        # Now the mirror's name is refused, by DNS and (asked for by address) by the proxy.
        assert sbx.commands.run(MIRROR + " || true").stdout == "000"
        pinned = MIRROR.replace("curl", f"curl --resolve deb.debian.org:80:{mirror_ip}")
        assert sbx.commands.run(pinned + " || true").stdout == "403"
    finally:
        sbx.kill()
