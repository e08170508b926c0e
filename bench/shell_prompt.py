"""`viv shell` start-up: runs `viv shell SANDBOX` on a pseudo-terminal (80x24) N times, as a
person does, and prints p50/p95 of the time from starting the CLI to the login shell's prompt
(`$ `) on the terminal. Each shell is then left with `exit 0`.

Usage: VIV_API_URL=... VIV_API_KEY=... python3 bench/shell_prompt.py VIV_BINARY SANDBOX_ID [N]
(the keystroke echo latency is `viv bench --terminal-only`).
"""

import fcntl
import os
import pty
import select
import struct
import sys
import termios
import time


def main() -> None:
    viv, sandbox = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    times = []
    for _ in range(n):
        start = time.monotonic()
        pid, fd = pty.fork()
        if pid == 0:
            os.execv(viv, [viv, "shell", sandbox])
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        seen = b""
        while b"$ " not in seen:
            ready, _, _ = select.select([fd], [], [], 60)
            if not ready:
                raise SystemExit(f"no prompt within 60 s: {seen!r}")
            seen += os.read(fd, 4096)
        times.append((time.monotonic() - start) * 1000)
        os.write(fd, b"exit 0\r")
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        os.waitpid(pid, 0)
    times.sort()
    p = lambda q: times[round((len(times) - 1) * q)]  # noqa: E731
    print(f"viv shell to prompt: p50 {p(0.5):.0f} ms, p95 {p(0.95):.0f} ms, min {times[0]:.0f} ms (n={n})")


if __name__ == "__main__":
    main()
