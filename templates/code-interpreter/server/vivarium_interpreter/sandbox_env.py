"""The sandbox's environment variables, given at sandbox creation (after the template snapshot was
taken) and written by the guest agent to a JSON object file.

Invariant: `read()` never raises: an absent, unreadable or malformed file means no variables, and
only entries whose name is a valid variable name and whose value is a string are kept (the rest
are logged and skipped), so helper code built from them is always well formed.
"""

import json
import logging
import os

from .languages import ENV_NAME

PATH = os.environ.get("VIVARIUM_SANDBOX_ENV_FILE", "/run/vivarium/sandbox-env.json")
log = logging.getLogger(__name__)


def read(path: str = PATH) -> dict:
    """The sandbox's env vars now (re-read at every call: the file may appear or change)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring %s: %s", path, e)
        return {}
    if not isinstance(data, dict):
        log.warning("ignoring %s: not a JSON object", path)
        return {}
    env = {}
    for name, value in data.items():
        if ENV_NAME.match(name) and isinstance(value, str) and "\0" not in value:
            env[name] = value
        else:
            log.warning("ignoring sandbox env var %r: bad name or non-string value", name)
    return env
