"""Code Interpreter benchmark: E2B's `e2b-code-interpreter` SDK against a Vivarium server
(E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY) whose `code-interpreter-v1` template is built.
Prints JSON: create → first `run_code("1+1")` (snapshot restore, warm kernels) against the same
on a cold boot, the `1+1` round trip, a chart round trip, and each language's first run."""

import json
import os
import statistics
import sys
import time

import httpx
from e2b_code_interpreter import Sandbox

CHART = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [3, 1, 2])\nplt.title('bench')\nplt.show()"
FIRST_RUNS = {
    "python": "1 + 1",
    "javascript": "1 + 1",
    "typescript": "const n: number = 1 + 1; n",
    "r": "1 + 1",
    "java": "1 + 1",
    "bash": "echo $((1 + 1))",
}


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]


def ms_since(start):
    return (time.perf_counter() - start) * 1000


def summary(values):
    return {"p50": round(statistics.median(values), 1), "p95": round(percentile(values, 0.95), 1), "n": len(values)}


def create_to_first_result(**opts):
    start = time.perf_counter()
    sbx = Sandbox.create(**opts)
    try:
        assert sbx.run_code("1+1").text == "2"
        return ms_since(start)
    finally:
        sbx.kill()


def cold_boot_to_first_result():
    """The same template booted instead of restored (Vivarium's `coldBoot`): its server and kernels
    start from scratch, as they would without warm kernels in the snapshot."""
    start = time.perf_counter()
    created = httpx.post(
        os.environ["E2B_API_URL"] + "/sandboxes",
        headers={"X-API-Key": os.environ["E2B_API_KEY"]},
        json={"templateID": "code-interpreter-v1", "coldBoot": True, "timeout": 600},
        timeout=600,
    )
    created.raise_for_status()
    sbx = Sandbox.connect(created.json()["sandboxID"])
    try:
        assert sbx.run_code("1+1", timeout=600).text == "2"
        return ms_since(start)
    finally:
        sbx.kill()


def main():
    creates = int(os.environ.get("CREATES", "20"))
    cold = int(os.environ.get("COLD", "3"))
    trips = int(os.environ.get("ROUND_TRIPS", "100"))
    restored = []
    for i in range(creates):
        restored.append(create_to_first_result())
        print(f"  create → first result {i + 1}/{creates}: {restored[-1]:.0f} ms", file=sys.stderr)
    booted = []
    for i in range(cold):
        booted.append(cold_boot_to_first_result())
        print(f"  cold boot → first result {i + 1}/{cold}: {booted[-1]:.0f} ms", file=sys.stderr)
    sbx = Sandbox.create(timeout=600)
    try:
        round_trips = []
        for _ in range(trips):
            start = time.perf_counter()
            assert sbx.run_code("1+1").text == "2"
            round_trips.append(ms_since(start))
        charts = []
        for _ in range(10):
            start = time.perf_counter()
            execution = sbx.run_code(CHART)
            assert any(r.chart is not None for r in execution.results), execution
            charts.append(ms_since(start))
    finally:
        sbx.kill()
    first_runs = {}
    sbx = Sandbox.create(timeout=600)
    try:
        for language, code in FIRST_RUNS.items():
            start = time.perf_counter()
            execution = sbx.run_code(code, language=language, timeout=600)
            assert execution.error is None, (language, execution.error)
            first_runs[language] = round(ms_since(start), 1)
            print(f"  first {language} run: {first_runs[language]:.0f} ms", file=sys.stderr)
    finally:
        sbx.kill()
    report = {
        "createToFirstResultMs": summary(restored),
        "runCodeRoundTripMs": summary(round_trips),
        "chartRoundTripMs": summary(charts),
        "firstRunPerLanguageMs": first_runs,
    }
    if booted:
        report["coldBootToFirstResultMs"] = summary(booted)
        report["restoreSpeedup"] = round(statistics.median(booted) / statistics.median(restored), 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
