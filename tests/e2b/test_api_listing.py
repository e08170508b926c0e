"""Listing through the SDK as E2B does it: newest or oldest first as asked, the `startedAfter` and
`startedBefore` filters, the template filter, and pages whose cursor walks running and paused
sandboxes together, skipping or repeating none even when sandboxes go away between pages."""

import datetime
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import json

from e2b import Sandbox, SandboxQuery, SandboxState


def _ids(items):
    return [s.sandbox_id for s in items]


def _walk(query, limit, order=None):
    paginator = Sandbox.list(query=query, limit=limit, order=order)
    seen = []
    while paginator.has_next:
        seen += _ids(paginator.next_items())
    return seen


def test_order_time_filters_template_and_pages_over_running_and_paused():
    case = f"listing-{time.time_ns()}"
    meta = {"case": case}
    created = []
    try:
        for _ in range(4):
            created.append(Sandbox.create(metadata=meta, timeout=600))
            # startedAt has millisecond precision: keep the four apart.
            time.sleep(0.05)
        created[1].pause()
        oldest_first = [s.sandbox_id for s in created]
        query = SandboxQuery(metadata=meta, state=[SandboxState.RUNNING, SandboxState.PAUSED])

        assert _walk(query, 10, order="asc") == oldest_first
        assert _walk(query, 10, order="desc") == oldest_first[::-1]
        # Pages of one walk running and paused sandboxes in one order.
        assert _walk(query, 1, order="desc") == oldest_first[::-1]
        assert _walk(query, 3, order="asc") == oldest_first

        infos = {s.sandbox_id: s for s in Sandbox.list(query=query, limit=10).next_items()}
        third_start = infos[oldest_first[2]].started_at
        after = SandboxQuery(metadata=meta, state=query.state, started_after=third_start)
        assert _walk(after, 10, order="asc") == oldest_first[2:]

        # startedBefore (E2B's API has it; the Python SDK does not send it).
        params = urllib.parse.urlencode({
            "metadata": urllib.parse.urlencode(meta),
            "state": "running,paused",
            "startedBefore": third_start.isoformat(),
            "order": "asc",
        })
        request = urllib.request.Request(
            f"{os.environ['E2B_API_URL']}/v2/sandboxes?{params}",
            headers={"X-API-Key": os.environ["E2B_API_KEY"]},
        )
        with urllib.request.urlopen(request) as response:
            before = [s["sandboxID"] for s in json.load(response)]
        assert before == oldest_first[:3]

        by_template = SandboxQuery(metadata=meta, state=query.state, template="base")
        assert _walk(by_template, 10, order="asc") == oldest_first
        elsewhere = SandboxQuery(metadata=meta, state=query.state, template="no-such-template")
        assert _walk(elsewhere, 10) == []

        # A sandbox killed between two pages, the one that ended the page included, neither
        # stops the walk nor makes it skip or repeat the others.
        paginator = Sandbox.list(query=query, limit=2, order="asc")
        first = _ids(paginator.next_items())
        assert first == oldest_first[:2]
        created[1].kill()
        rest = []
        while paginator.has_next:
            rest += _ids(paginator.next_items())
        assert rest == oldest_first[2:]
    finally:
        for sbx in created:
            try:
                sbx.kill()
            except Exception:
                pass


def test_a_bad_order_or_time_is_a_400():
    for query in ("order=sideways", "startedAfter=yesterday", "nextToken=%%%"):
        request = urllib.request.Request(
            f"{os.environ['E2B_API_URL']}/v2/sandboxes?{query}",
            headers={"X-API-Key": os.environ["E2B_API_KEY"]},
        )
        try:
            urllib.request.urlopen(request)
            raise AssertionError(f"{query} was accepted")
        except urllib.error.HTTPError as err:
            assert err.code == 400, (query, err.code)
