"""The bash kernel: bash_kernel (PyPI) made safe for the code interpreter's server.

Three changes to bash_kernel 0.10, everything else is bash_kernel's:
- silent executions publish nothing on iopub (bash_kernel publishes an ``error`` for a non-zero
  exit status even when silent; the server's helper runs ``cd``/``export``/``unset`` must emit
  nothing);
- incomplete input (an unterminated quote, a trailing ``if``) gets an error reply; bash_kernel
  lets pexpect's ValueError escape, and then no execute_reply is ever sent;
- pexpect searches only the tail of bash's output for the prompt and reads in large chunks, so
  a long line of output costs linear time (bash_kernel rescans the whole buffer on every read,
  which takes minutes for a few megabytes).
Note: bash runs on a pseudo-terminal, so its stderr arrives as stdout.

Usage (from kernel.json): python3 bashkernel.py -f {connection_file}
"""

from bash_kernel.kernel import BashKernel
from ipykernel.kernelapp import IPKernelApp

SEARCH_WINDOW = 4096  # bytes of recent output searched for the prompt
READ_SIZE = 1 << 16


class SafeBashKernel(BashKernel):
    """BashKernel with quiet silent runs, incomplete-input errors and linear-time output."""

    silent = False

    def _start_bash(self):
        super()._start_bash()
        self.bashwrapper.child.searchwindowsize = SEARCH_WINDOW
        self.bashwrapper.child.maxread = READ_SIZE

    def send_response(self, stream, msg_or_type, content=None, *args, **kwargs):
        if self.silent and stream is self.iopub_socket:
            return None
        return super().send_response(stream, msg_or_type, content, *args, **kwargs)

    def do_execute(self, code, silent, store_history=True, user_expressions=None,
                   allow_stdin=False):
        try:
            return super().do_execute(code, silent, store_history, user_expressions, allow_stdin)
        except ValueError as exc:  # pexpect: "Continuation prompt found - input was incomplete"
            error = {"ename": "IncompleteInput", "evalue": str(exc).splitlines()[0],
                     "traceback": str(exc).splitlines()}
            self.send_response(self.iopub_socket, "error", error)
            return dict(error, status="error", execution_count=self.execution_count)


if __name__ == "__main__":
    IPKernelApp.launch_instance(kernel_class=SafeBashKernel)
