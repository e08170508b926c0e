"""Checks the javascript, typescript, java, r and bash kernels through jupyter_client.

Usage: python3 selftest.py [--dev] [--only NAME,...]
  (no flag)  the installed specs (/usr/local/share/jupyter/kernels, as in the guest);
  --dev      builds specs from this source tree into a temporary JUPYTER_PATH first (javac,
             the TypeScript code cache, specs.py; typescript from `npm root -g` or
             $VIV_TYPESCRIPT), for a development host.
Each kernel is started, then checked for: results, stdout/stderr streams, errors, state across
executions, silent executions (no output, no count), execution counts, hostile input (an
unterminated string, 5 MB of output, non-UTF-8 bytes, a child that exits), interrupting an
infinite loop (the kernel stays usable), restart (state cleared) and shutdown. Prints one line per
check and per-kernel timings (start-up until kernel_info answers; first execution); exits 1 if
any check failed. Invariant: every wait is bounded (TIMEOUT), so a hung kernel fails, not hangs.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 120  # seconds any single step may take (TCG guests are slow)

# Per kernel: code snippets for each check. "result" values are substrings of text/plain (or of
# stdout); an "extra" entry (code, expected, "error") expects an error mentioning `expected`,
# (code, "", "any") any reply (the child may be exiting: a race the kernel must survive).
CASES = {
    "javascript": {
        "result": ("1 + 1", "2"),
        "define": "const a = 20; let b = 1; function twice(x) { return 2 * x }",
        "use": ("const a2 = a; twice(a2 + b)", "42"),
        "redefine": "const a = 21;",
        "stdout": ("console.log('hello')", "hello"),
        "stderr": ("console.error('oops')", "oops"),
        "error": ("throw new RangeError('boom')", "RangeError"),
        "extra": [("await new Promise(r => setTimeout(() => r(7), 50))", "7"),
                  ("import path from 'path'; path.join('a', 'b')", "a/b"),
                  ("process.chdir('/tmp'); process.cwd()", "/tmp"),
                  ("try { throw new Error('y'.repeat(5e6)) } catch (e) { e.message.length }", "5000000"),
                  ("function deep(n) { return deep(n + 1) }\ntry { deep(0) } catch (e) { e.name }", "RangeError"),
                  ("require('child_process').spawn('sleep', ['600'], { stdio: 'inherit' }); process.exit(4)",
                   "exited (code 4)", "error"),
                  ("process.stdin.destroy(); 'stdin closed'", "stdin closed"),
                  ("1 + 2", "", "any")],
        "silent": ("process.env.VIV_SELFTEST = 'yes'", "process.env.VIV_SELFTEST", "yes"),
        "unterminated": "'abc",
        "huge": "console.log('x'.repeat(5000000))",
        "binary": "process.stdout.write(Buffer.from([0xff, 0xfe, 0x00, 0x41, 0x80]))",
        "exit": "process.exit(3)",
        "loop": "while (true) {}",
        "async_loop": "await null; while (true) {}",
        "is_complete": ("function f() {", "incomplete"),
    },
    "typescript": {
        "result": ("const n: number = 1; n + 1", "2"),
        "define": "interface P { x: number }\nconst a: P = { x: 20 }; let b: number = 1;",
        "use": ("const twice = (v: number): number => 2 * v; twice(a.x + b)", "42"),
        "redefine": "const a: P = { x: 21 };",
        "stdout": ("console.log('hello' as string)", "hello"),
        "stderr": ("console.error('oops')", "oops"),
        "error": ("throw new RangeError('boom')", "RangeError"),
        "extra": [("enum Color { Red, Green }\nColor.Green", "1"),
                  ("await Promise.resolve(5 as number)", "5")],
        "silent": ("process.env.VIV_SELFTEST = 'yes'", "process.env.VIV_SELFTEST", "yes"),
        "unterminated": "const s: string = 'abc",
        "huge": "console.log('x'.repeat(5000000))",
        "binary": "process.stdout.write(Buffer.from([0xff, 0xfe, 0x00, 0x41, 0x80]))",
        "exit": "process.exit(3)",
        "loop": "while (true) {}",
        "is_complete": ("function f() {", "incomplete"),
    },
    "java": {
        "result": ("1 + 1", "2"),
        "define": "int a = 20; int b = 1; int twice(int x) { return 2 * x; }",
        "use": ("twice(a + b)", "42"),
        "redefine": "int a = 21;",
        "stdout": ("System.out.println(\"hello\")", "hello"),
        "stderr": ("System.err.println(\"oops\")", "oops"),
        "error": ("throw new IllegalStateException(\"boom\")", "IllegalStateException"),
        "extra": [("import java.util.*;\nList<Integer> l = new ArrayList<>(List.of(3, 1, 2));\n"
                   "Collections.sort(l);\nl", "[1, 2, 3]"),
                  ("String s = \"a\" + 1;\ns", "a1"),
                  ("vivWarmUp", "cannot find symbol", "error")],
        "silent": ("int silentValue = 5;", "silentValue", "5"),
        "unterminated": "String s = \"abc",
        "huge": "System.out.print(\"x\".repeat(5000000))",
        "binary": "System.out.write(new byte[] {(byte) 0xff, (byte) 0xfe, 0, 65}); System.out.flush();",
        "exit": "System.exit(3);",
        "loop": "while (true) {}",
        "is_complete": ("void f() {", "incomplete"),
    },
    "r": {
        "result": ("1 + 1", "2"),
        "define": "a <- 20; b <- 1; twice <- function(x) 2 * x",
        "use": ("twice(a + b)", "42"),
        "redefine": "a <- 21",
        "stdout": ("cat('hello\\n')", "hello"),
        "stderr": ("message('oops')", "oops"),
        "error": ("stop('boom')", "boom"),
        "extra": [("data.frame(x = 1:2)", "x")],
        "silent": ("Sys.setenv(VIV_SELFTEST = 'yes')", "Sys.getenv('VIV_SELFTEST')", "yes"),
        "unterminated": "s <- 'abc",
        "huge": "cat(strrep('x', 5000000))",
        "binary": "cat('\\xff\\xfeA\\n')",
        "loop": "while (TRUE) {}",
    },
    "bash": {
        "define": "A=20; B=1; twice() { echo $((2 * $1)); }",
        "use": ("twice $((A + B))", "42"),
        "redefine": "A=21",
        "stdout": ("echo hello", "hello"),  # no "stderr": bash_kernel's pty merges it into stdout
        "error": ("false", ""),
        "extra": [("cd /tmp && pwd", "/tmp")],
        "silent": ("export VIV_SELFTEST=yes", "echo $VIV_SELFTEST", "yes"),
        "unterminated": "echo 'abc",
        "huge": "head -c 5000000 /dev/zero | tr '\\0' x",
        "binary": "printf '\\377\\376\\000A'",
        "exit": "exit 3",
        "loop": "while true; do :; done",
    },
}


class Failure(Exception):
    pass


class Session:
    """One kernel under test: runs code and collects what the kernel published for it."""

    def __init__(self, name):
        from jupyter_client import KernelManager
        self.name = name
        self.km = KernelManager(kernel_name=name)
        started = time.monotonic()
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=TIMEOUT)
        self.startup = time.monotonic() - started

    def run(self, code, silent=False, timeout=TIMEOUT):
        """Returns (reply content, {"stdout","stderr","results","errors","other"})."""
        # stop_on_error=False: ipykernel otherwise aborts requests that arrive just after an error
        msg_id = self.kc.execute(code, silent=silent, store_history=not silent, stop_on_error=False)
        out = {"stdout": "", "stderr": "", "results": [], "errors": [], "other": []}
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"no idle status within {timeout}s for {code[:40]!r}")
            try:
                msg = self.kc.get_iopub_msg(timeout=left)
            except Exception:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status":
                if content["execution_state"] == "idle":
                    break
            elif kind == "stream":
                out[content["name"]] += content["text"]
            elif kind in ("execute_result", "display_data"):
                out["results"].append(content)
            elif kind == "error":
                out["errors"].append(content)
            elif kind != "execute_input":
                out["other"].append(kind)
        while True:
            reply = self.kc.get_shell_msg(timeout=max(1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"], out

    def close(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def text_of(out):
    return "\n".join(r["data"].get("text/plain", "") for r in out["results"])


def check_result(session, code, expected):
    reply, out = session.run(code)
    if reply["status"] != "ok":
        raise Failure(f"{code[:40]!r} failed: {out['errors'][:1]}")
    shown = text_of(out) + out["stdout"]
    if expected not in shown:
        raise Failure(f"{code[:40]!r} showed {shown[:200]!r}, expected {expected!r}")
    return reply


def check_error(session, code, expected=""):
    reply, out = session.run(code)
    if reply["status"] != "error" or not out["errors"]:
        raise Failure(f"{code[:40]!r}: status {reply['status']}, errors {out['errors']}")
    error = out["errors"][0]
    described = error["ename"] + error["evalue"] + "\n".join(error["traceback"])
    if expected not in described:
        raise Failure(f"{code[:40]!r}: error {described[:200]!r} lacks {expected!r}")


def check_kernel(name, cases, report):
    started = time.monotonic()
    session = Session(name)
    report(name, "start-up", f"{session.startup:.2f}s")
    first = time.monotonic()
    try:
        steps = kernel_steps(session, cases)
        for label, step in steps:
            try:
                detail = step()
                report(name, label, detail or "ok")
            except Failure as failure:
                report(name, label, f"FAIL {failure}", failed=True)
            if label == "result":
                report(name, "first execution", f"{time.monotonic() - first:.2f}s")
    finally:
        session.close()
    report(name, "total", f"{time.monotonic() - started:.2f}s")


def kernel_steps(s, c):
    """The checks of one kernel, in order, as (label, callable) pairs."""
    steps = []
    if "result" in c:
        steps.append(("result", lambda: check_result(s, *c["result"]) and None))
    steps.append(("state", lambda: (s.run(c["define"]), check_result(s, *c["use"]))[1] and None))
    steps.append(("redeclare", lambda: expect_ok(s, c["redefine"])))
    steps.append(("stdout", lambda: expect_stream(s, "stdout", *c["stdout"])))
    if "stderr" in c:
        steps.append(("stderr", lambda: expect_stream(s, "stderr", *c["stderr"])))
    steps.append(("error", lambda: check_error(s, *c["error"])))
    for index, (code, expected, *kind) in enumerate(c.get("extra", [])):
        check = {"error": check_error, "any": lambda s, code, _: expect_no_hang(s, code)}.get(
            kind[0] if kind else "", check_result)
        steps.append((f"extra {index + 1}", lambda check=check, code=code, expected=expected: check(s, code, expected) and None))
    steps.append(("silent", lambda: check_silent(s, *c["silent"])))
    steps.append(("unterminated", lambda: expect_no_hang(s, c["unterminated"], want_error=True)))
    steps.append(("huge output", lambda: check_huge(s, c["huge"])))
    steps.append(("binary output", lambda: expect_no_hang(s, c["binary"])))
    if "exit" in c:
        steps.append(("child exits", lambda: check_exit(s, c["exit"], c["stdout"])))
    steps.append(("interrupt", lambda: check_interrupt(s, c["loop"], c["stdout"])))
    if "async_loop" in c:
        steps.append(("interrupt async", lambda: check_interrupt(s, c["async_loop"], c["stdout"])))
    if "is_complete" in c:
        steps.append(("is_complete", lambda: check_is_complete(s, *c["is_complete"])))
    steps.append(("restart", lambda: check_restart(s, c)))
    return steps


def expect_ok(session, code):
    reply, out = session.run(code)
    if reply["status"] != "ok":
        raise Failure(f"{code[:40]!r}: {out['errors'][:1]}")


def expect_stream(session, stream, code, expected):
    reply, out = session.run(code)
    if expected not in out[stream]:
        raise Failure(f"{stream} was {out[stream][:200]!r}, expected {expected!r} (reply {reply['status']})")


def check_silent(session, code, probe, expected):
    before, _ = session.run("")  # empty code: counted like any execution
    reply, out = session.run(code, silent=True)
    published = out["stdout"] + out["stderr"] + str(out["results"] + out["errors"] + out["other"])
    if published != "[]":
        raise Failure(f"silent run published {published[:200]!r}")
    after = check_result(session, probe, expected)
    if after["execution_count"] != before["execution_count"] + 1:
        raise Failure(f"counts {before['execution_count']} -> {after['execution_count']}: silent run counted")
    return f"ok (count {before['execution_count']} -> {after['execution_count']})"


def expect_no_hang(session, code, want_error=False):
    started = time.monotonic()
    reply, out = session.run(code)
    if want_error and reply["status"] != "error":
        raise Failure(f"status {reply['status']}, expected an error")
    detail = out["errors"][0]["evalue"][:60] if out["errors"] else repr(out["stdout"][:20])
    return f"{reply['status']} in {time.monotonic() - started:.2f}s: {detail}"


def check_huge(session, code):
    started = time.monotonic()
    reply, out = session.run(code)
    size = len(out["stdout"])
    if size < 5000000:
        raise Failure(f"got {size} characters of 5000000 (status {reply['status']})")
    return f"{size} characters in {time.monotonic() - started:.2f}s"


def check_exit(session, code, stdout_case):
    reply, out = session.run(code)
    expect_stream(session, "stdout", *stdout_case)
    return f"{reply['status']}: {out['errors'][0]['evalue'][:70] if out['errors'] else ''}; usable after"


def check_interrupt(session, loop, stdout_case):
    msg_id = session.kc.execute(loop, stop_on_error=False)
    time.sleep(3)
    started = time.monotonic()
    session.km.interrupt_kernel()
    deadline = started + TIMEOUT
    while time.monotonic() < deadline:
        try:
            reply = session.kc.get_shell_msg(timeout=1)
        except Exception:
            continue
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    else:
        raise Failure("the loop did not stop")
    stopped = time.monotonic() - started
    expect_stream(session, "stdout", *stdout_case)
    return f"{reply['content']['status']} after {stopped:.2f}s; usable after"


def check_is_complete(session, code, expected):
    msg_id = session.kc.is_complete(code)
    reply = session.kc.get_shell_msg(timeout=TIMEOUT)
    status = reply["content"].get("status")
    if reply["parent_header"].get("msg_id") != msg_id or status != expected:
        raise Failure(f"is_complete said {status!r}, expected {expected!r}")


def check_restart(session, cases):
    started = time.monotonic()
    session.km.restart_kernel(now=False)
    session.kc.wait_for_ready(timeout=TIMEOUT)
    probe = cases["use"][0]
    reply, out = session.run(probe)
    if reply["status"] == "ok" and cases["use"][1] in text_of(out) + out["stdout"]:
        raise Failure("state survived the restart")
    return f"state cleared, {time.monotonic() - started:.2f}s"


def build_dev_specs(root):
    """Compiles and writes the specs of this source tree under ROOT/kernels; returns ROOT."""
    classes, jar = os.path.join(root, "java-classes"), os.path.join(root, "vivjshell.jar")
    subprocess.run(["javac", "-nowarn", "-XDignore.symbol.file", "-d", classes,
                    os.path.join(HERE, "java", "VivJShell.java")], check=True)
    subprocess.run(["jar", "--create", "--file", jar, "-C", classes, "."], check=True)
    global_modules = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True).stdout.strip()
    typescript = os.environ.get("VIV_TYPESCRIPT") or os.path.join(global_modules, "typescript")
    cache = os.path.join(root, "typescript.cache")
    subprocess.run(["node", os.path.join(HERE, "js", "tsload.js"), typescript, cache], check=True)
    subprocess.run([sys.executable, os.path.join(HERE, "specs.py"), "--dest", os.path.join(root, "kernels"),
                    "--python", sys.executable, "--typescript", typescript, "--typescript-cache", cache,
                    "--global-modules", global_modules, "--java-classpath", jar], check=True)
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", action="store_true")
    parser.add_argument("--only", default=",".join(CASES))
    args = parser.parse_args()
    if args.dev:
        os.environ["JUPYTER_PATH"] = build_dev_specs(tempfile.mkdtemp(prefix="kernels-selftest-"))
    try:
        failures = run_checks(args.only.split(","))
    finally:
        if args.dev:
            shutil.rmtree(os.environ["JUPYTER_PATH"], ignore_errors=True)
    print("FAILED: " + ", ".join(f"{k}/{l}" for k, l in failures) if failures else "ALL OK")
    sys.exit(1 if failures else 0)


def run_checks(names):
    """Checks each named kernel; returns the failed (kernel, check) pairs."""
    failures = []

    def report(kernel, label, detail, failed=False):
        print(f"{kernel:10} {label:16} {detail}", flush=True)
        if failed:
            failures.append((kernel, label))

    for name in names:
        try:
            check_kernel(name, CASES[name], report)
        except Exception as exc:  # a kernel that does not start fails its own checks only
            report(name, "kernel", f"FAIL {type(exc).__name__}: {exc}", failed=True)
    return failures


if __name__ == "__main__":
    main()
