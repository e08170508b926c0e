# Shared by the benchmark scripts: builds Vivarium and prepares the guest images; `start_server
# PORT [serve options]` starts a server on a scratch data directory (the image cache is shared)
# and sets VIV_API_URL / VIV_API_KEY for it. Servers and their data go when the script exits.
# VIV_BIN names a `viv` binary already built (scripts/test passes its debug build); without it
# the release build is made.
if [ -n "${VIV_BIN:-}" ]; then
  viv=$VIV_BIN
else
  bash scripts/install-deps
  bash scripts/build
  viv=target/release/viv
fi
export VIV_CACHE_DIR="${VIV_CACHE_DIR:-/var/cache/vivarium}"
"$viv" image build >/dev/null
servers=()
scratch=()
cleanup() {
  for pid in "${servers[@]}"; do kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  for dir in "${scratch[@]}"; do
    rm -rf "$dir" "/dev/shm/vivarium-$(printf %s "$dir" | sha256sum | cut -c1-8)"
  done
}
trap cleanup EXIT
start_server() {
  local port=$1
  shift
  local data
  data="$(mktemp -d /tmp/viv-bench.XXXXXX)"
  scratch+=("$data")
  "$viv" serve --listen "127.0.0.1:$port" --data-dir "$data" --accel "${VIV_ACCEL:-auto}" \
    --snapshots="${VIV_SNAPSHOTS:-true}" --on-shutdown kill "$@" >"$data/serve.log" 2>&1 &
  servers+=($!)
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 "${servers[-1]}" 2>/dev/null || { cat "$data/serve.log"; exit 1; }
    sleep 0.2
  done
  export VIV_API_URL="http://127.0.0.1:$port"
  VIV_API_KEY="$("$viv" keys create --data-dir "$data" --name bench 2>/dev/null)"
  export VIV_API_KEY
}
