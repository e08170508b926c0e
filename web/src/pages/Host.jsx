// The host: what /health says (accelerator, running counts, network slots, pool), the nodes of
// its cluster (/nodes: role, state, memory, sandboxes, heartbeat; one row for a server alone),
// the server's own Prometheus metrics, and sandbox/VM counts. Refreshed by events and on demand.
import { useEffect } from 'preact/hooks';
import { get, subscribe } from '../api.js';
import { useLoad } from '../hooks.js';
import { ErrorLine, Section, Table } from '../components/ui.jsx';

/** Prometheus text format: samples as [name{labels}, value], comments dropped. */
function samples(text) {
  return (text || '')
    .split('\n')
    .filter((l) => l && !l.startsWith('#'))
    .map((l) => {
      const i = l.lastIndexOf(' ');
      return [l.slice(0, i), l.slice(i + 1)];
    });
}

/** Memory in use of a node's total, as "used / total GiB" and a bar. */
function memory(node) {
  const { memoryUsedMib: used, memoryMib: total } = node.capacity;
  if (!total) return '—';
  const gib = (mib) => (mib / 1024).toFixed(1);
  return (
    <span class="meter" title={`${used} of ${total} MiB`}>
      <progress max={total} value={used} /> {gib(used)} / {gib(total)} GiB
    </span>
  );
}

export function Host() {
  const health = useLoad(() => get('/health'), []);
  const metrics = useLoad(() => get('/metrics'), []);
  const nodes = useLoad(() => get('/nodes'), []);
  useEffect(() => {
    const again = () => {
      health.reload();
      metrics.reload();
      nodes.reload();
    };
    const a = subscribe('sandbox', again);
    const b = subscribe('vm', again);
    const c = subscribe('node', () => nodes.reload());
    return () => {
      a();
      b();
      c();
    };
  }, []);
  const h = health.data;
  return (
    <>
      <Section title="Host" actions={<button onClick={() => (health.reload(), metrics.reload())}>Refresh</button>}>
        <ErrorLine error={health.error} />
        {h && (
          <dl class="facts" data-testid="host-facts">
            <dt>Version</dt>
            <dd>{h.version}</dd>
            <dt>Accelerator</dt>
            <dd>{h.accel}</dd>
            <dt>Running sandboxes</dt>
            <dd data-testid="host-sandboxes">{h.sandboxes}</dd>
            <dt>Warm pool</dt>
            <dd>{h.pooled}</dd>
            <dt>Network</dt>
            <dd>{h.network}</dd>
            <dt>Network slots in use</dt>
            <dd>{h.networkSlots}</dd>
            <dt>Snapshots</dt>
            <dd>{String(h.snapshots)}</dd>
            <dt>Confinement</dt>
            <dd>{typeof h.confinement === 'string' ? h.confinement : JSON.stringify(h.confinement)}</dd>
          </dl>
        )}
      </Section>
      <Section title="Nodes" actions={<button onClick={() => nodes.reload()}>Refresh</button>}>
        <ErrorLine error={nodes.error} />
        <Table
          testId="nodes"
          columns={[
            ['Name', (n) => (n.local ? `${n.name} (this server)` : n.name)],
            ['Role', (n) => n.role],
            ['State', (n) => <span class={`state state-${n.state}`}>{n.state}</span>],
            ['Memory', memory],
            ['vCPUs', (n) => (n.capacity.vcpus ? `${n.capacity.vcpusUsed} / ${n.capacity.vcpus}` : '—')],
            ['Sandboxes', (n) => n.sandboxes],
            ['Accelerator', (n) => n.capacity.accel || '—'],
            ['Last heartbeat', (n) => new Date(n.heartbeatAt).toLocaleTimeString()],
          ]}
          rows={nodes.data}
          rowKey={(n) => n.id}
        />
      </Section>
      <Section title="Server metrics">
        <ErrorLine error={metrics.error} />
        <Table columns={[['Metric', (m) => m[0]], ['Value', (m) => m[1]]]} rows={samples(metrics.data)} rowKey={(m) => m[0]} />
      </Section>
    </>
  );
}
