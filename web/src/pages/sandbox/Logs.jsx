// A sandbox's console log (GET /sandboxes/{id}/logs, E2B's shape {"logs":[{timestamp,line}]}).
import { get, seg } from '../../api.js';
import { useLoad } from '../../hooks.js';
import { ErrorLine } from '../../components/ui.jsx';

export function Logs({ id }) {
  const logs = useLoad(() => get(`/sandboxes/${seg(id)}/logs`), [id]);
  if (logs.error?.status === 404 && !logs.data) return <p class="empty">This server keeps no console log for the sandbox.</p>;
  return (
    <div>
      <button onClick={logs.reload}>Refresh</button>
      <ErrorLine error={logs.error} />
      <pre class="log" data-testid="console-log">
        {(logs.data?.logs || []).map((l) => `${l.timestamp ?? ''} ${l.line}`).join('\n') || 'No output yet.'}
      </pre>
    </div>
  );
}
