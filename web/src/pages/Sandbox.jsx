// One sandbox: its facts and actions, and tabs for its terminal, files, processes, metrics and
// console log. Its state follows the event stream.
import { useEffect, useState } from 'preact/hooks';
import { get, seg, socket, subscribe } from '../api.js';
import { useLoad } from '../hooks.js';
import { ErrorLine, Section, State, Tabs } from '../components/ui.jsx';
import { Terminal } from '../components/Terminal.jsx';
import { SandboxActions } from './SandboxActions.jsx';
import { Files } from './sandbox/Files.jsx';
import { Processes } from './sandbox/Processes.jsx';
import { Metrics } from './sandbox/Metrics.jsx';
import { Logs } from './sandbox/Logs.jsx';

const TABS = [
  ['terminal', 'Terminal'],
  ['files', 'Files'],
  ['processes', 'Processes'],
  ['metrics', 'Metrics'],
  ['logs', 'Console log'],
];

/** The sandbox terminal protocol (viv-terminal.v1): JSON control frames. */
function SandboxTerminal({ id }) {
  return (
    <Terminal
      label="shell"
      open={(cols, rows) => socket(`/sandboxes/${seg(id)}/terminal?cols=${cols}&rows=${rows}`, ['viv-terminal.v1'])}
      resize={(ws, cols, rows) => ws.send(JSON.stringify({ type: 'resize', cols, rows }))}
      onText={(msg, term, setStatus) => {
        if (msg.type === 'started') setStatus(`running (pid ${msg.pid})`);
        else if (msg.type === 'exit') setStatus(`exited with code ${msg.exitCode}`);
        else if (msg.type === 'error') {
          setStatus(`error: ${msg.message}`);
          term.write(`\r\n${msg.message}\r\n`);
        }
      }}
    />
  );
}

export function Sandbox({ id }) {
  const sandbox = useLoad(() => get(`/sandboxes/${seg(id)}`), [id]);
  const [tab, setTab] = useState('terminal');
  useEffect(
    () =>
      subscribe('sandbox', (event) => {
        if (event.id === id) sandbox.setData((s) => s && { ...s, state: event.state });
      }),
    [id],
  );
  const s = sandbox.data;
  return (
    <>
      <Section title={`Sandbox ${id}`}>
        <ErrorLine error={sandbox.error} />
        {s && (
          <>
            <dl class="facts">
              <dt>State</dt>
              <dd data-testid="sandbox-state">
                <State state={s.state} />
              </dd>
              <dt>Template</dt>
              <dd>{s.alias || s.templateID}</dd>
              <dt>CPU / memory</dt>
              <dd>
                {s.cpuCount} / {s.memoryMB} MiB
              </dd>
              <dt>Started</dt>
              <dd>{s.startedAt && new Date(s.startedAt).toLocaleString()}</dd>
              <dt>Ends</dt>
              <dd>{s.endAt && new Date(s.endAt).toLocaleString()}</dd>
              {s.metadata && Object.keys(s.metadata).length > 0 && (
                <>
                  <dt>Metadata</dt>
                  <dd>
                    {Object.entries(s.metadata)
                      .map(([k, v]) => `${k}=${v}`)
                      .join(', ')}
                  </dd>
                </>
              )}
            </dl>
            <SandboxActions sandbox={s} />
          </>
        )}
      </Section>
      <Section title="">
        <Tabs tabs={TABS} value={tab} onChange={setTab} />
        {tab === 'terminal' && (s?.state === 'running' ? <SandboxTerminal id={id} /> : <p class="empty">The terminal opens while the sandbox runs.</p>)}
        {tab === 'files' && <Files id={id} />}
        {tab === 'processes' && <Processes id={id} />}
        {tab === 'metrics' && <Metrics id={id} />}
        {tab === 'logs' && <Logs id={id} />}
      </Section>
    </>
  );
}
