// What can be done to a sandbox: pause/resume, kill; and in full (the sandbox page) fork,
// snapshot, timeout and network rules.
import { useState } from 'preact/hooks';
import { del, post, put, seg } from '../api.js';
import { useAction } from '../hooks.js';
import { ErrorLine } from '../components/ui.jsx';

const lines = (text) =>
  text
    .split(/[\n,]/)
    .map((s) => s.trim())
    .filter(Boolean);

export function SandboxActions({ sandbox, compact }) {
  const id = seg(sandbox.sandboxID);
  const [run, busy, error] = useAction();
  const [note, setNote] = useState(null);
  const [timeout, setTimeoutValue] = useState('300');
  const [snapName, setSnapName] = useState('');
  const [net, setNet] = useState({ allowOut: '', denyOut: '', internet: true });
  const act = (fn, done) =>
    run(async () => {
      const result = await fn();
      setNote(done ? done(result) : null);
    });
  const paused = sandbox.state === 'paused';
  return (
    <div class="sandbox-actions">
      <div class="buttons">
        {paused ? (
          <button disabled={busy} onClick={() => act(() => post(`/sandboxes/${id}/resume`, {}))}>
            Resume
          </button>
        ) : (
          <button disabled={busy} onClick={() => act(() => post(`/sandboxes/${id}/pause`))}>
            Pause
          </button>
        )}
        <button class="danger" disabled={busy} onClick={() => confirm(`Kill ${sandbox.sandboxID}?`) && act(() => del(`/sandboxes/${id}`))}>
          Kill
        </button>
        {!compact && (
          <button disabled={busy || paused} onClick={() => act(() => post(`/sandboxes/${id}/fork`, {}), (r) => `forked: ${r.map((f) => f.sandbox?.sandboxID || f.error?.message).join(', ')}`)}>
            Fork
          </button>
        )}
      </div>
      {!compact && (
        <div class="forms">
          <form onSubmit={(e) => (e.preventDefault(), act(() => post(`/sandboxes/${id}/snapshots`, snapName ? { name: snapName } : {}), (s) => `snapshot ${s.snapshotID}`))}>
            <input placeholder="snapshot name (optional)" value={snapName} onInput={(e) => setSnapName(e.target.value)} />
            <button disabled={busy}>Snapshot</button>
          </form>
          <form onSubmit={(e) => (e.preventDefault(), act(() => post(`/sandboxes/${id}/timeout`, { timeout: Number(timeout) }), () => `ends in ${timeout} s`))}>
            <input type="number" min="1" value={timeout} onInput={(e) => setTimeoutValue(e.target.value)} aria-label="timeout in seconds" />
            <button disabled={busy}>Set timeout</button>
          </form>
          <form
            onSubmit={(e) => (
              e.preventDefault(),
              act(
                () => put(`/sandboxes/${id}/network`, { allowOut: lines(net.allowOut), denyOut: lines(net.denyOut), allow_internet_access: net.internet }),
                () => 'network rules replaced',
              )
            )}
          >
            <input placeholder="allow out (CIDRs, domains)" value={net.allowOut} onInput={(e) => setNet({ ...net, allowOut: e.target.value })} />
            <input placeholder="deny out" value={net.denyOut} onInput={(e) => setNet({ ...net, denyOut: e.target.value })} />
            <label class="inline">
              <input type="checkbox" checked={net.internet} onChange={(e) => setNet({ ...net, internet: e.target.checked })} /> internet
            </label>
            <button disabled={busy}>Set network rules</button>
          </form>
        </div>
      )}
      {note && <p class="note">{note}</p>}
      <ErrorLine error={error} />
    </div>
  );
}
