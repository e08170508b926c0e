"""Helpers of the lifecycle tests (`test_lifecycle_*.py`)."""

import json
import os
import re
import time
import urllib.request

from e2b import Sandbox


def wait_for_state(sandbox_id, state, limit=300):
    """Waits until the API reports the sandbox in `state` (a pause under load takes a while)."""
    deadline = time.time() + limit
    while True:
        now = Sandbox.get_info(sandbox_id).state.value
        if now == state:
            return
        if time.time() > deadline:
            raise AssertionError(f"sandbox {sandbox_id} is {now}, not {state}, after {limit} s")
        time.sleep(0.2)


def raw_info(sandbox_id):
    """`GET /sandboxes/{id}` as JSON (fields the SDK's SandboxInfo leaves out, like pauseMode)."""
    request = urllib.request.Request(
        f"{os.environ['E2B_API_URL']}/sandboxes/{sandbox_id}", headers={"X-API-Key": os.environ["E2B_API_KEY"]}
    )
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def metric(name):
    """A counter of the server's `/metrics` (summed over the cluster's servers, whose URLs
    VIV_TEST_SERVER_URLS lists when the suite runs against a cluster: each counts its own)."""
    total = 0
    urls = os.environ.get("VIV_TEST_SERVER_URLS", os.environ["E2B_API_URL"]).split(",")
    for url in urls:
        request = urllib.request.Request(f"{url}/metrics", headers={"X-API-Key": os.environ["E2B_API_KEY"]})
        with urllib.request.urlopen(request) as response:
            text = response.read().decode()
        found = re.search(rf"^{name} (\d+)$", text, re.M)
        assert found, f"no metric {name} at {url}"
        total += int(found.group(1))
    return total


def boot_id(sandbox):
    """The guest kernel's boot id: a new one after every boot, the same after a memory restore."""
    return sandbox.commands.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
