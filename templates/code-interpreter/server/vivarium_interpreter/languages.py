"""The languages a context can run: their names, kernel specs, and the helper code the server runs
silently in a kernel to change its working directory and environment variables.

Invariants: `normalize` maps every accepted spelling (case-insensitive, surrounding blanks ignored,
empty → python) to one canonical `Language`; the canonical names are the ones E2B returns in a
context's `language` field. Helper code embeds paths, names and values only as properly escaped
literals of the target language, so no value can break out of its literal.
"""

import json
import re
import shlex
from dataclasses import dataclass
from typing import Callable, Optional

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _py_or_js_literal(value: str) -> str:
    """A JSON string literal: valid as a Python and a JavaScript string literal."""
    return json.dumps(value)


def _r_literal(value: str) -> str:
    """An R double-quoted string literal (R reads JSON's escapes; non-ASCII stays as is)."""
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class Language:
    """One supported language: `name` as the API reports it, `kernel_spec` the Jupyter kernel spec
    name, and helper code builders (None: the kernel takes no helper runs, e.g. Java).
    `values_are_displays`: the kernel shows a cell's values as display_data, never as an
    execute_result (IRkernel); the last one is then the execution's main result."""

    name: str
    kernel_spec: str
    chdir: Optional[Callable[[str], str]]
    setenv: Optional[Callable[[str, str], str]]
    unsetenv: Optional[Callable[[str], str]]
    values_are_displays: bool = False

    @property
    def takes_helpers(self) -> bool:
        return self.chdir is not None

    def env_code(self, assign: dict, remove: list) -> str:
        """One helper program setting `assign` and removing `remove` (empty string: nothing to do)."""
        lines = [self.setenv(k, v) for k, v in assign.items()]
        lines += [self.unsetenv(k) for k in remove]
        return "\n".join(lines)


PYTHON = Language(
    "python",
    "python3",
    chdir=lambda p: f"__import__('os').chdir({_py_or_js_literal(p)})",
    setenv=lambda k, v: f"__import__('os').environ[{_py_or_js_literal(k)}] = {_py_or_js_literal(v)}",
    unsetenv=lambda k: f"__import__('os').environ.pop({_py_or_js_literal(k)}, None)",
)


def _js(name: str) -> Language:
    return Language(
        name,
        name,
        chdir=lambda p: f"process.chdir({_py_or_js_literal(p)});",
        setenv=lambda k, v: f"process.env[{_py_or_js_literal(k)}] = {_py_or_js_literal(v)};",
        unsetenv=lambda k: f"delete process.env[{_py_or_js_literal(k)}];",
    )


JAVASCRIPT = _js("javascript")
TYPESCRIPT = _js("typescript")
R = Language(
    "r",
    "r",
    chdir=lambda p: f"invisible(setwd({_r_literal(p)}))",
    setenv=lambda k, v: f"invisible(Sys.setenv({_r_literal(k)} = {_r_literal(v)}))",
    unsetenv=lambda k: f"invisible(Sys.unsetenv({_r_literal(k)}))",
    values_are_displays=True,
)
BASH = Language(
    "bash",
    "bash",
    chdir=lambda p: f"cd {shlex.quote(p)}",
    setenv=lambda k, v: f"export {k}={shlex.quote(v)}",
    unsetenv=lambda k: f"unset {k}",
)
JAVA = Language("java", "java", chdir=None, setenv=None, unsetenv=None)

_BY_SPELLING = {
    "python": PYTHON,
    "js": JAVASCRIPT,
    "javascript": JAVASCRIPT,
    "ts": TYPESCRIPT,
    "typescript": TYPESCRIPT,
    "r": R,
    "java": JAVA,
    "bash": BASH,
}
SUPPORTED = "python, javascript (js), typescript (ts), r, java, bash"


class UnknownLanguage(ValueError):
    """A language name none of the kernels runs."""

    def __init__(self, given: str):
        super().__init__(f"unsupported language {given!r}: supported languages are {SUPPORTED}")


def normalize(given: Optional[str]) -> Language:
    """The language for an API spelling; None or blank means python."""
    key = (given or "").strip().lower() or "python"
    try:
        return _BY_SPELLING[key]
    except KeyError:
        raise UnknownLanguage(given) from None
