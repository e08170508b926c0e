"""`allowPublicTraffic: false`: the create answer (and connect's) carries a `trafficAccessToken`,
and the sandbox's ports answer only requests carrying it in `E2B-Traffic-Access-Token` (403
otherwise); envd traffic keeps its own access token; sandboxes are public by default. Sandbox info carries
the domain of its host names (`sandboxDomain` in the SDK)."""

import os
import time
import urllib.error
import urllib.request

from e2b import Sandbox


def _get(host, headers=None):
    request = urllib.request.Request(
        f"{os.environ['E2B_API_URL']}/index.html", headers={"Host": host, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_private_traffic_needs_the_traffic_access_token():
    sbx = Sandbox.create(timeout=600, network={"allow_public_traffic": False})
    try:
        token = sbx.traffic_access_token
        assert token, "a sandbox with allow_public_traffic=False gets a traffic token"
        sbx.files.write("/home/user/site/index.html", "private")
        sbx.commands.run("python3 -m http.server 8000 --directory /home/user/site", background=True)
        for _ in range(150):
            probe = sbx.commands.run("curl -s -o /dev/null -w %{http_code} localhost:8000/ || true").stdout
            if probe not in ("", "000"):
                break
            time.sleep(0.2)
        host = sbx.get_host(8000)
        status, body = _get(host)
        assert status == 403 and b"E2B-Traffic-Access-Token" in body, (status, body)
        assert _get(host, {"E2B-Traffic-Access-Token": "wrong"})[0] == 403
        assert _get(host, {"E2B-Traffic-Access-Token": token}) == (200, b"private")
        again = Sandbox.connect(sbx.sandbox_id)
        assert again.traffic_access_token == token
    finally:
        sbx.kill()


def test_sandboxes_are_public_by_default(sandbox):
    assert sandbox.traffic_access_token is None


def test_sandbox_info_carries_the_sandbox_domain(sandbox):
    info = Sandbox.get_info(sandbox.sandbox_id)
    assert info.sandbox_domain == "localhost"
    assert sandbox.get_host(8000) == f"8000-{sandbox.sandbox_id}.{info.sandbox_domain}"
