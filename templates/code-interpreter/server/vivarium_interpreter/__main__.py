"""Entry point: `python3 -m vivarium_interpreter [--port 49999] [--default-languages python,javascript]`.

Ends the kernels a previous (crashed) instance left behind, then serves until SIGTERM/SIGINT,
shutting its kernels down on the way out. Logs go to stderr (start.sh sends them to a file).
"""

import argparse
import logging

from aiohttp import web

from .app import make_app
from .contexts import DEFAULT_LANGUAGES
from .kernel import end_orphans
from .languages import UnknownLanguage, normalize


def main() -> None:
    parser = argparse.ArgumentParser(prog="vivarium_interpreter")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=49999)
    parser.add_argument(
        "--default-languages",
        default=",".join(lang.name for lang in DEFAULT_LANGUAGES),
        help="languages whose default contexts start at once; /health waits for them",
    )
    args = parser.parse_args()
    try:
        defaults = tuple(normalize(name) for name in args.default_languages.split(",") if name.strip())
    except UnknownLanguage as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    end_orphans()
    web.run_app(
        make_app(defaults),
        host=args.host,
        port=args.port,
        handler_cancellation=True,
        access_log_format='%a "%r" %s %Tfs',
        print=None,
    )


if __name__ == "__main__":
    main()
