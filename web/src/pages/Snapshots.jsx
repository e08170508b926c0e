// The snapshot tree as a graph: templates are roots, snapshot nodes (pause, fork, named) hang
// from their parents, and the sandboxes sitting on a node are listed in it. A node can be
// started (a sandbox created from it) or deleted. Redrawn when a sandbox changes state.
import { useEffect, useState } from 'preact/hooks';
import { bytes, del, get, post, request, seg, subscribe } from '../api.js';
import { href, useAction, useLoad } from '../hooks.js';
import { ErrorLine, Section } from '../components/ui.jsx';

const W = 190;
const H = 64;
const GAP_X = 40;
const GAP_Y = 24;

async function allSnapshots() {
  const out = [];
  let token = '';
  for (let i = 0; i < 50; i++) {
    const response = await request('GET', `/snapshots?limit=100${token ? `&nextToken=${encodeURIComponent(token)}` : ''}`, undefined, { raw: true });
    out.push(...(await response.json()));
    token = response.headers.get('x-next-token');
    if (!token) break;
  }
  return out;
}

/** Lays the forest out left to right: x by depth, y by leaf order. */
function layout(snapshots, templates) {
  const templateSize = new Map((templates || []).map((t) => [t.templateID, t.sizeBytes]));
  const byId = new Map(snapshots.map((s) => [s.snapshotID, s]));
  const nodes = new Map();
  const roots = [];
  for (const s of snapshots) {
    const parent = s.parentID && byId.has(s.parentID) ? s.parentID : `template:${s.templateID}`;
    if (parent.startsWith('template:') && !nodes.has(parent)) {
      nodes.set(parent, { id: parent, label: s.templateID, kind: 'template', size: templateSize.get(s.templateID), children: [] });
      roots.push(parent);
    }
  }
  for (const s of snapshots) nodes.set(s.snapshotID, { id: s.snapshotID, snap: s, kind: s.kind, label: s.names?.[0] || s.snapshotID, children: [] });
  for (const s of snapshots) {
    const parent = s.parentID && byId.has(s.parentID) ? s.parentID : `template:${s.templateID}`;
    nodes.get(parent).children.push(s.snapshotID);
  }
  let row = 0;
  const place = (id, depth) => {
    const n = nodes.get(id);
    n.x = depth * (W + GAP_X);
    if (n.children.length === 0) {
      n.y = row++ * (H + GAP_Y);
    } else {
      n.children.forEach((c) => place(c, depth + 1));
      const ys = n.children.map((c) => nodes.get(c).y);
      n.y = (Math.min(...ys) + Math.max(...ys)) / 2;
    }
  };
  roots.forEach((r) => place(r, 0));
  return { nodes: [...nodes.values()], height: Math.max(1, row) * (H + GAP_Y) };
}

export function Snapshots() {
  const list = useLoad(allSnapshots, []);
  const templates = useLoad(() => get('/templates'), []);
  const [selected, setSelected] = useState(null);
  const [run, busy, error] = useAction();
  useEffect(() => subscribe('sandbox', () => list.reload()), []);
  const { nodes, height } = layout(list.data || [], templates.data);
  const width = Math.max(1, ...nodes.map((n) => n.x + W));
  const sel = nodes.find((n) => n.id === selected)?.snap;
  const start = () =>
    run(async () => {
      const created = await post('/sandboxes', { templateID: sel.snapshotID });
      location.hash = href('sandboxes', created.sandboxID);
    });
  const remove = () =>
    confirm(`Delete snapshot ${sel.snapshotID}?`) &&
    run(async () => {
      await del(`/snapshots/${seg(sel.snapshotID)}`);
      setSelected(null);
      list.reload();
    });
  return (
    <Section title="Snapshot tree">
      <ErrorLine error={list.error || error} />
      {nodes.length === 0 ? (
        <p class="empty">No snapshot yet: pause, fork or snapshot a sandbox.</p>
      ) : (
        <div class="graph-wrap">
          <svg width={width} height={height} data-testid="snapshot-graph" role="img" aria-label="snapshot tree">
            {nodes.flatMap((n) =>
              n.children.map((c) => {
                const child = nodes.find((m) => m.id === c);
                return <path key={`${n.id}-${c}`} class="edge" d={`M${n.x + W},${n.y + H / 2} C${n.x + W + GAP_X / 2},${n.y + H / 2} ${child.x - GAP_X / 2},${child.y + H / 2} ${child.x},${child.y + H / 2}`} />;
              }),
            )}
            {nodes.map((n) => (
              <g key={n.id} class={`node node-${n.kind} ${selected === n.id ? 'selected' : ''}`} transform={`translate(${n.x},${n.y})`} data-node={n.id} data-kind={n.kind} onClick={() => n.snap && setSelected(n.id)}>
                <rect width={W} height={H} rx="6" />
                <text x="8" y="18" class="title">
                  {n.kind}: {n.label.length > 15 ? n.label.slice(0, 14) + '…' : n.label}
                </text>
                {n.kind === 'template' && n.size != null && (
                  <text x="8" y="36">
                    {bytes(n.size)}
                  </text>
                )}
                {n.snap && (
                  <>
                    <text x="8" y="36">
                      {bytes(n.snap.sizeBytes)}
                    </text>
                    <text x="8" y="54">
                      {n.snap.sandboxes.length ? `on it: ${n.snap.sandboxes.join(', ').slice(0, 20)}` : ''}
                    </text>
                  </>
                )}
              </g>
            ))}
          </svg>
        </div>
      )}
      {sel && (
        <div class="selection" data-testid="snapshot-selection">
          <p>
            <b>{sel.snapshotID}</b> ({sel.kind}{sel.names.length ? `, ${sel.names.join(', ')}` : ''}) of {sel.sandboxID}, {bytes(sel.sizeBytes)}, taken {new Date(sel.createdAt).toLocaleString()}
            {sel.sandboxes.length > 0 && <> — sandboxes on it: {sel.sandboxes.join(', ')}</>}
          </p>
          <button disabled={busy} onClick={start}>
            Start a sandbox from it
          </button>
          <button class="danger" disabled={busy} onClick={remove}>
            Delete
          </button>
        </div>
      )}
    </Section>
  );
}
