// Templates: the list, a build from a spec with its log streaming as it runs, delete.
import { useRef, useState } from 'preact/hooks';
import { bytes, del, get, ndjson, request, seg } from '../api.js';
import { useAction, useLoad } from '../hooks.js';
import { ErrorLine, Section, Table } from '../components/ui.jsx';

const SAMPLE = 'FROM base\nRUN echo hello from the build\n';

/** One build event as a log line. */
function line(event) {
  switch (event.type) {
    case 'step':
      return `Step ${event.index}/${event.total} (line ${event.line})${event.cached ? ' [cached]' : ''}: ${event.instruction}`;
    case 'log':
      return event.text.replace(/\n$/, '');
    case 'done':
      return `Built ${event.template.templateID} in ${(event.buildMs / 1000).toFixed(1)} s`;
    case 'error':
      return `Error${event.line ? ` (line ${event.line})` : ''}: ${event.message}`;
    default:
      return JSON.stringify(event);
  }
}

function Build({ onBuilt }) {
  const [name, setName] = useState('');
  const [spec, setSpec] = useState(SAMPLE);
  const [log, setLog] = useState([]);
  const [run, busy, error] = useAction();
  const pre = useRef(null);
  const submit = (e) => {
    e.preventDefault();
    setLog([]);
    run(async () => {
      const response = await request('POST', '/templates', { name, spec }, { raw: true });
      for await (const event of ndjson(response)) {
        setLog((l) => [...l, line(event)]);
        if (pre.current) pre.current.scrollTop = pre.current.scrollHeight;
        if (event.type === 'error') throw new Error(event.message);
      }
      onBuilt();
    });
  };
  return (
    <form class="grid-form" onSubmit={submit} data-testid="build-template">
      <label>
        Name
        <input name="name" value={name} onInput={(e) => setName(e.target.value)} required />
      </label>
      <label class="wide">
        Spec (Dockerfile subset)
        <textarea name="spec" rows="6" class="mono" value={spec} onInput={(e) => setSpec(e.target.value)} />
      </label>
      <button disabled={busy}>{busy ? 'Building…' : 'Build'}</button>
      <ErrorLine error={error} />
      {log.length > 0 && (
        <pre class="log wide" ref={pre} data-testid="build-log">
          {log.join('\n')}
        </pre>
      )}
    </form>
  );
}

export function Templates() {
  const list = useLoad(() => get('/templates'), []);
  const [run, busy, error] = useAction();
  const remove = (t) =>
    confirm(`Delete template ${t.templateID}?`) &&
    run(async () => {
      await del(`/templates/${seg(t.templateID)}`);
      list.reload();
    });
  const columns = [
    ['Name', (t) => t.templateID],
    ['Kind', (t) => t.kind],
    ['From', (t) => t.from || ''],
    ['CPU / memory', (t) => `${t.cpuCount} / ${t.memoryMB} MiB`],
    ['Size', (t) => bytes(t.sizeBytes)],
    ['Built', (t) => (t.createdAt ? new Date(t.createdAt).toLocaleString() : '')],
    [
      '',
      (t) =>
        t.kind !== 'base' && (
          <button class="danger" disabled={busy} onClick={() => remove(t)}>
            Delete
          </button>
        ),
    ],
  ];
  return (
    <>
      <Section title="Build a template">
        <Build onBuilt={list.reload} />
      </Section>
      <Section title="Templates">
        <ErrorLine error={list.error || error} />
        <Table testId="templates" columns={columns} rows={list.data} rowKey={(t) => t.templateID} />
      </Section>
    </>
  );
}
