// Sandboxes: the live list (loaded once, then kept current by the server's event stream) and
// the form that creates one from a template.
import { useEffect, useState } from 'preact/hooks';
import { get, post, seg, subscribe } from '../api.js';
import { href, useAction, useLoad } from '../hooks.js';
import { ErrorLine, Section, State, Table } from '../components/ui.jsx';
import { SandboxActions } from './SandboxActions.jsx';

const LISTED = 'starting,running,paused';

/** `k=v` lines as an object. */
export function pairs(text) {
  const out = {};
  for (const line of text.split('\n')) {
    const t = line.trim();
    if (!t) continue;
    const eq = t.indexOf('=');
    if (eq <= 0) throw new Error(`"${t}" is not KEY=VALUE`);
    out[t.slice(0, eq).trim()] = t.slice(eq + 1);
  }
  return out;
}

function CreateForm({ onCreated }) {
  const templates = useLoad(() => get('/templates'), []);
  const [form, setForm] = useState({ template: 'base', timeout: '300', metadata: '', env: '' });
  const [run, busy, error] = useAction();
  const field = (name) => ({ value: form[name], onInput: (e) => setForm({ ...form, [name]: e.target.value }) });
  const submit = (e) => {
    e.preventDefault();
    run(async () => {
      const body = { templateID: form.template.trim() };
      if (form.timeout) body.timeout = Number(form.timeout);
      const metadata = pairs(form.metadata);
      const env = pairs(form.env);
      if (Object.keys(metadata).length) body.metadata = metadata;
      if (Object.keys(env).length) body.envVars = env;
      const created = await post('/sandboxes', body);
      onCreated(created);
    });
  };
  return (
    <form class="grid-form" onSubmit={submit} data-testid="create-sandbox">
      <label>
        Template
        <input list="template-names" name="template" {...field('template')} required />
        <datalist id="template-names">
          {(templates.data || []).map((t) => (
            <option key={t.templateID} value={t.templateID} />
          ))}
        </datalist>
      </label>
      <label>
        Timeout (s)
        <input type="number" min="1" name="timeout" {...field('timeout')} />
      </label>
      <label>
        Metadata (KEY=VALUE lines)
        <textarea name="metadata" rows="2" {...field('metadata')} />
      </label>
      <label>
        Environment (KEY=VALUE lines)
        <textarea name="env" rows="2" {...field('env')} />
      </label>
      <button type="submit" disabled={busy}>
        {busy ? 'Creating…' : 'Create sandbox'}
      </button>
      <ErrorLine error={error} />
    </form>
  );
}

export function Sandboxes() {
  const list = useLoad(() => get(`/v2/sandboxes?state=${LISTED}&limit=100`), []);
  // Events keep the list current: states change in place, new sandboxes are fetched, gone ones
  // leave.
  useEffect(
    () =>
      subscribe('sandbox', async (event) => {
        if (!LISTED.split(',').includes(event.state)) {
          list.setData((rows) => (rows || []).filter((s) => s.sandboxID !== event.id));
          return;
        }
        let known = false;
        list.setData((rows) => {
          known = (rows || []).some((s) => s.sandboxID === event.id);
          return (rows || []).map((s) => (s.sandboxID === event.id ? { ...s, state: event.state } : s));
        });
        if (!known) {
          try {
            const sandbox = await get(`/sandboxes/${seg(event.id)}`);
            list.setData((rows) => [...(rows || []).filter((s) => s.sandboxID !== event.id), sandbox]);
          } catch {
            // Gone again before we asked.
          }
        }
      }),
    [],
  );
  const columns = [
    ['ID', (s) => <a href={href('sandboxes', s.sandboxID)}>{s.sandboxID}</a>],
    ['Template', (s) => s.alias || s.templateID],
    ['State', (s) => <State state={s.state} />],
    ['CPU / memory', (s) => `${s.cpuCount} / ${s.memoryMB} MiB`],
    ['Ends', (s) => (s.endAt ? new Date(s.endAt).toLocaleTimeString() : '')],
    ['', (s) => <SandboxActions sandbox={s} compact />],
  ];
  return (
    <>
      <Section title="New sandbox">
        <CreateForm onCreated={(created) => (location.hash = href('sandboxes', created.sandboxID))} />
      </Section>
      <Section title="Sandboxes">
        <ErrorLine error={list.error} />
        <Table testId="sandboxes" columns={columns} rows={list.data} rowKey={(s) => s.sandboxID} empty="No sandbox is running." />
      </Section>
    </>
  );
}
