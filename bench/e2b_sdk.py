"""E2B SDK benchmark: the official `e2b` Python SDK against a Vivarium server (E2B_API_URL,
E2B_SANDBOX_URL, E2B_API_KEY), printing p50/p95 of create + `echo hi` + kill, the `true`
round trip through the SDK and the proxy, and 10 MiB file write/read throughput."""

import json
import os
import statistics
import sys
import time

from e2b import Sandbox


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]


def main():
    creates = int(os.environ.get("CREATES", "30"))
    trips = int(os.environ.get("ROUND_TRIPS", "100"))
    lifecycle = []
    for i in range(creates):
        start = time.perf_counter()
        sbx = Sandbox.create()
        assert sbx.commands.run("echo hi").stdout == "hi\n"
        sbx.kill()
        lifecycle.append((time.perf_counter() - start) * 1000)
        print(f"  create + echo + kill {i + 1}/{creates}: {lifecycle[-1]:.0f} ms", file=sys.stderr)
    sbx = Sandbox.create(timeout=600)
    try:
        round_trips = []
        for _ in range(trips):
            start = time.perf_counter()
            sbx.commands.run("true")
            round_trips.append((time.perf_counter() - start) * 1000)
        data = os.urandom(10 << 20)
        start = time.perf_counter()
        sbx.files.write("/tmp/bench.bin", data)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        back = sbx.files.read("/tmp/bench.bin", format="bytes")
        read_s = time.perf_counter() - start
        assert back == data
    finally:
        sbx.kill()
    report = {
        "createEchoKillMs": {"p50": round(percentile(lifecycle, 0.5), 1), "p95": round(percentile(lifecycle, 0.95), 1), "n": creates},
        "runTrueMs": {"p50": round(statistics.median(round_trips), 1), "p95": round(percentile(round_trips, 0.95), 1), "n": trips},
        "file10MiB": {"writeMBps": round(10 * 1.048576 / write_s, 1), "readMBps": round(10 * 1.048576 / read_s, 1)},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
