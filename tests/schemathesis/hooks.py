"""Schemathesis hooks for the Vivarium API run (`tests/schemathesis/run` loads this module).

- teaches schemathesis the `egress-target` string format of the OpenAPI document (an IPv4
  address, a CIDR block or a domain name pattern), so generated egress rules are valid ones;
- validates every line of the NDJSON streams (`/exec`, `POST /templates`) against the event
  shapes the document gives, and that a stream ends with its final event (`ndjson_events`);
- keeps the run's footprint bounded: after each operation that started a VM, sandboxes beyond
  the newest VIV_ST_MAX_SANDBOXES are killed, and named snapshots beyond the newest
  VIV_ST_MAX_SNAPSHOTS are deleted, through the API (the fuzzer itself never cleans up);
- points most sandbox-scoped requests at sandboxes that exist, so that operations on running
  and paused sandboxes are exercised rather than only their 404s;
- gives disk and ISO uploads a body the server can store (a small raw image, an ISO 9660
  header) and its real SHA-256 where the request carries a well-formed one, so that uploads are
  exercised rather than only their checksum mismatches (`_storage_upload`).

VIV_ST_URL and VIV_ST_KEY name the server and its API key.
"""

import base64
import hashlib
import json
import os
import random
import re

import requests
import schemathesis
from hypothesis import strategies as st

URL = os.environ["VIV_ST_URL"]
KEY = os.environ["VIV_ST_KEY"]
MAX_SANDBOXES = int(os.environ.get("VIV_ST_MAX_SANDBOXES", "3"))
MAX_SNAPSHOTS = int(os.environ.get("VIV_ST_MAX_SNAPSHOTS", "3"))
HEADERS = {"X-API-Key": KEY}
# Which known sandbox a request is pointed at; seeded, so a run's choices repeat.
CHOICE = random.Random(int(os.environ.get("VIV_ST_SEED", "1")))

# --- the egress-target format -------------------------------------------------------------

_octet = st.integers(0, 255)
_address = st.tuples(_octet, _octet, _octet, _octet).map(lambda t: ".".join(map(str, t)))
_cidr = st.tuples(_address, st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}")
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_tld = st.from_regex(r"[a-z][a-z0-9]{1,5}", fullmatch=True)
_domain = st.tuples(st.lists(_label, min_size=1, max_size=3), _tld).map(
    lambda t: ".".join(t[0] + [t[1]])
)
_wildcard = _domain.map(lambda d: f"*.{d}")
schemathesis.openapi.format("egress-target", st.one_of(_address, _cidr, _domain, _wildcard))

# --- NDJSON streams -----------------------------------------------------------------------

_INT, _STR, _BOOL, _OBJ, _B64 = int, str, bool, dict, "base64"

# Fields every event of a type must have, and their types.
EXEC_EVENTS = {
    "start": {"pid": _INT},
    "stdout": {"data": _B64},
    "stderr": {"data": _B64},
    "end": {"exitCode": _INT, "status": _STR},
    "error": {"message": _STR},
}
BUILD_EVENTS = {
    "step": {"index": _INT, "total": _INT, "line": _INT, "instruction": _STR, "cached": _BOOL},
    "log": {"stream": _STR, "text": _STR},
    "done": {"template": _OBJ, "buildMs": _INT},
    "error": {"message": _STR},
}


def _ndjson(response):
    kind = response.headers.get("content-type", [""])
    kind = kind[0] if isinstance(kind, list) else kind
    return kind.startswith("application/x-ndjson")


def _events(response):
    lines = [line for line in response.content.split(b"\n") if line.strip()]
    return [json.loads(line) for line in lines]


@schemathesis.deserializer("application/x-ndjson")
def last_event(ctx, response):
    """The final event of a stream; `ndjson_events` checks every line."""
    events = _events(response)
    return events[-1] if events else {}


@schemathesis.check
def ndjson_events(ctx, response, case):
    """Every line of an NDJSON answer is an event of the documented shape; the last ends it."""
    if not _ndjson(response):
        return None
    shapes, finals = (
        (EXEC_EVENTS, {"end", "error"})
        if case.operation.path.endswith("/exec")
        else (BUILD_EVENTS, {"done", "error"})
    )
    events = _events(response)
    assert events, "an NDJSON answer without any event"
    for number, event in enumerate(events, 1):
        kind = event.get("type")
        assert kind in shapes, f"event {number} has an unknown type: {event}"
        for field, expected in shapes[kind].items():
            assert field in event, f"event {number} ({kind}) lacks `{field}`: {event}"
            value = event[field]
            if expected == _B64:
                assert isinstance(value, str), f"event {number}: `{field}` is not a string"
                base64.b64decode(value, validate=True)
            elif expected is _INT:
                assert isinstance(value, int) and not isinstance(value, bool), (
                    f"event {number}: `{field}` is not an integer: {event}"
                )
            else:
                assert isinstance(value, expected), f"event {number}: `{field}` has the wrong type: {event}"
    assert events[-1]["type"] in finals, f"the stream ended without {sorted(finals)}: {events[-1]}"
    return None


# --- resources ----------------------------------------------------------------------------

# Operations after which a VM may have been started or a snapshot taken.
_STARTS = ("/sandboxes", "/v2/sandboxes", "/fork", "/connect", "/resume")


def _api(method, path, body=None):
    try:
        response = requests.request(method, URL + path, headers=HEADERS, json=body, timeout=300)
        return response.json() if response.content and response.ok else None
    except (requests.RequestException, ValueError):
        return None


def _known_sandboxes():
    sandboxes = _api("GET", "/sandboxes") or []
    return [s["sandboxID"] for s in sandboxes if s.get("state") in ("running", "paused")]


def _trim():
    """Kills sandboxes and deletes named snapshots beyond the newest few."""
    sandboxes = _api("GET", "/sandboxes") or []
    sandboxes.sort(key=lambda s: s.get("startedAt", ""))
    for sandbox in sandboxes[: max(0, len(sandboxes) - MAX_SANDBOXES)]:
        _api("DELETE", f"/sandboxes/{sandbox['sandboxID']}")
    snapshots = [s for s in (_api("GET", "/snapshots") or []) if s.get("kind") == "snapshot"]
    for snapshot in snapshots[: max(0, len(snapshots) - MAX_SNAPSHOTS)]:
        _api("DELETE", f"/snapshots/{snapshot['snapshotID']}")


# Volume content routes take a volume's own token: the run script creates one volume and passes
# its token as the run's `Authorization` header (so the auth checks still alter or drop it).
_CONTENT_VOLUME = os.environ.get("VIV_ST_VOLUME", "")


def _point_at_volume(case):
    """Four in five volume content requests go to the run's volume."""
    if not _CONTENT_VOLUME or not case.operation.path.startswith("/volumecontent/"):
        return
    if CHOICE.random() < 0.8:
        case.path_parameters["volumeID"] = _CONTENT_VOLUME


# --- storage uploads ------------------------------------------------------------------------

_RAW_IMAGE = bytes(64 * 1024)
_ISO_IMAGE = bytearray(64 * 1024)
_ISO_IMAGE[0x8000:0x8006] = b"\x01CD001"
_ISO_IMAGE = bytes(_ISO_IMAGE)
_SHA256 = re.compile(r"^(sha256:)?[0-9a-fA-F]{64}$")


def _storage_upload(case):
    """A disk upload or import, or an ISO upload, gets a body the pool accepts; a well-formed
    checksum it carries (query or header) becomes the body's, a malformed one stays (a 400)."""
    path, method = case.operation.path, case.method.upper()
    if method != "PUT":
        return
    if path in ("/disks/{name}/upload", "/disks/{name}/import"):
        body = _RAW_IMAGE
    elif path == "/isos/{name}":
        body = _ISO_IMAGE
    else:
        return
    case.body = body
    digest = hashlib.sha256(body).hexdigest()
    query = case.query if isinstance(case.query, dict) else None
    headers = case.headers if isinstance(case.headers, dict) else None
    for params in (query, headers):
        if params is None:
            continue
        for key in list(params):
            if key.lower() in ("sha256", "x-content-sha256"):
                value = params[key]
                if isinstance(value, str) and _SHA256.match(value):
                    params[key] = digest
    if path.endswith("/upload") and not any(
        k.lower() in ("sha256", "x-content-sha256") for p in (query, headers) if p for k in p
    ):
        if case.query is None:
            case.query = {}
        if isinstance(case.query, dict):
            case.query["sha256"] = digest


@schemathesis.hook
def before_call(context, case, kwargs):
    """Points four in five sandbox-scoped requests at a sandbox that exists (starting one when
    none does: the fuzzer's own live only as long as the `timeout` it drew), and volume content
    requests at a volume (`_point_at_volume`). Generated `volumeMounts` name volumes that do not
    exist (a 400 by design), so they are dropped."""
    _point_at_volume(case)
    _storage_upload(case)
    if isinstance(case.body, dict) and "volumeMounts" in case.body:
        case.body = {k: v for k, v in case.body.items() if k != "volumeMounts"}
    if "sandboxID" in (case.path_parameters or {}) and CHOICE.random() < 0.8:
        known = _known_sandboxes()
        if not known:
            created = _api("POST", "/sandboxes", {"timeout": 3600})
            known = [created["sandboxID"]] if created else []
        if known:
            case.path_parameters["sandboxID"] = CHOICE.choice(sorted(known))


@schemathesis.hook
def after_call(context, case, response):
    path = case.operation.path
    if case.method.upper() == "POST" and path.endswith(_STARTS + ("/snapshots",)):
        _trim()
