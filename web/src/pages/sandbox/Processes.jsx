// A sandbox's processes (envd's process.Process/List), with a refresh button.
import { post, seg } from '../../api.js';
import { useLoad } from '../../hooks.js';
import { ErrorLine, Table } from '../../components/ui.jsx';

export function Processes({ id }) {
  const list = useLoad(() => post(`/sandboxes/${seg(id)}/envd/process.Process/List`, {}), [id]);
  const columns = [
    ['PID', (p) => p.pid],
    ['Command', (p) => [p.config?.cmd, ...(p.config?.args || [])].join(' ')],
    ['Tag', (p) => p.tag || ''],
    ['Directory', (p) => p.config?.cwd || ''],
  ];
  return (
    <div>
      <button onClick={list.reload}>Refresh</button>
      <ErrorLine error={list.error} />
      <Table columns={columns} rows={list.data?.processes} rowKey={(p) => p.pid} empty="No process started through the API runs." />
    </div>
  );
}
