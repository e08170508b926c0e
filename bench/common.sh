# Shared by the benchmark scripts: builds Vivarium, starts a server on a scratch data directory
# (the image cache is shared) and exports VIV_API_URL / VIV_API_KEY; the server and its data go
# when the calling script exits.
bash scripts/install-deps
bash scripts/build
viv=target/release/viv
export VIV_CACHE_DIR="${VIV_CACHE_DIR:-/var/cache/vivarium}"
"$viv" image build >/dev/null
data="$(mktemp -d /tmp/viv-bench.XXXXXX)"
port="${VIV_BENCH_PORT:-3199}"
"$viv" serve --listen "127.0.0.1:$port" --data-dir "$data" --accel "${VIV_ACCEL:-auto}" \
  --snapshots="${VIV_SNAPSHOTS:-true}" >"$data/serve.log" 2>&1 &
server=$!
shm="/dev/shm/vivarium-$(printf %s "$data" | sha256sum | cut -c1-8)"
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true; rm -rf "$data" "$shm"' EXIT
for _ in $(seq 1 300); do
  curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { cat "$data/serve.log"; exit 1; }
  sleep 0.2
done
export VIV_API_URL="http://127.0.0.1:$port"
export VIV_API_KEY="$("$viv" keys create --data-dir "$data" --name bench 2>/dev/null)"
