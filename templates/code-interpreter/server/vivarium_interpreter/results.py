"""Translation of Jupyter messages into the NDJSON events E2B's SDKs parse.

Invariants: every event is a JSON-serializable dict with a `type`; result events carry only the
fields that have a value (nulls left out); an execution produces at most one `error` event (the
first error) and at most one `number_of_executions` event (`Translator` tracks both).
"""

import time
from typing import Optional

# Jupyter MIME type → field of the SDK's Result; the two e2b/* types come from the Python
# kernel's startup extension (structured chart data and a DataFrame's columns).
MIME_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}


def result_event(bundle: dict, is_main_result: bool) -> dict:
    """A `result` event from a MIME bundle; MIME types the SDK has no field for go to `extra`."""
    event = {"type": "result"}
    extra = {}
    for mime, value in bundle.items():
        field = MIME_FIELDS.get(mime)
        if field is None:
            extra[mime] = value
        elif value is not None:
            event[field] = value
    text = event.get("text")
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] == "'":
        # A string's repr: E2B reports the string itself.
        event["text"] = text[1:-1]
    if extra:
        event["extra"] = extra
    event["is_main_result"] = is_main_result
    return event


def error_event(name: str, value: str, traceback) -> dict:
    if isinstance(traceback, list):
        traceback = "\n".join(str(line) for line in traceback)
    return {"type": "error", "name": name, "value": value, "traceback": traceback or ""}


class Translator:
    """Turns one execution's messages into events, keeping the per-execution invariants."""

    def __init__(self, values_are_displays: bool = False):
        self.error_sent = False
        self.count_sent = False
        # For kernels that show values only as display_data (IRkernel), the latest display is
        # held back: it is the main result if nothing else is shown after it (`finish`).
        self.values_are_displays = values_are_displays
        self.held: Optional[dict] = None

    def message(self, msg: dict) -> list:
        """The events for an IOPub message (none, one, or a held-back display and one)."""
        event = self._event(msg)
        if event is None:
            return []
        if not self.values_are_displays or event["type"] != "result":
            return [event]
        earlier, self.held = self.held, event
        return [earlier] if earlier is not None else []

    def finish(self, completed: bool) -> list:
        """The held-back display, if any: the main result when the execution completed."""
        held, self.held = self.held, None
        if held is None:
            return []
        held["is_main_result"] = completed and "text" in held
        return [held]

    def _event(self, msg: dict) -> Optional[dict]:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            return {"type": name, "text": content.get("text", ""), "timestamp": time.time_ns()}
        if kind == "execute_input" and not self.count_sent:
            self.count_sent = True
            return {"type": "number_of_executions", "execution_count": content.get("execution_count")}
        if kind == "execute_result":
            return result_event(content.get("data", {}), True)
        if kind in ("display_data", "update_display_data"):
            return result_event(content.get("data", {}), False)
        if kind == "error":
            return self.error(content.get("ename", "Error"), content.get("evalue", ""),
                              content.get("traceback", []))
        return None

    def reply(self, reply: Optional[dict]) -> list:
        """The events an execute_reply adds: the count if not seen yet, an error if not sent."""
        if reply is None:
            return []
        content = reply["content"]
        events = []
        if not self.count_sent and isinstance(content.get("execution_count"), int):
            self.count_sent = True
            events.append({"type": "number_of_executions",
                           "execution_count": content["execution_count"]})
        if content.get("status") == "error":
            event = self.error(content.get("ename", "Error"), content.get("evalue", ""),
                               content.get("traceback", []))
            if event:
                events.append(event)
        return events

    def error(self, name: str, value: str, traceback) -> Optional[dict]:
        """An error event unless one was already sent for this execution."""
        if self.error_sent:
            return None
        self.error_sent = True
        return error_event(name, value, traceback)
