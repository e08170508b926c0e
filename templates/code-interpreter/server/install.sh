#!/bin/sh
# Installs the code interpreter server where the Dockerfile copied it
# (/opt/vivarium/code-interpreter/server): makes start.sh executable, byte-compiles the server
# and the Python kernel's startup extension (faster first start), and checks that the system
# python3 has what they import. Run as root at template build; idempotent.
set -eu
DIR=$(cd "$(dirname "$0")" && pwd)
chmod 755 "$DIR/start.sh"
python3 -c 'import aiohttp, jupyter_client, ipykernel, matplotlib_inline, e2b_charts, pandas, PIL'
python3 -m compileall -q "$DIR/vivarium_interpreter" "$DIR/ipython"
chmod -R a+rX "$DIR"
