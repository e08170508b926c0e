// VMs (the VM manager): the list kept current by events, start/stop, and the storage they use
// (disks, ISOs).
import { useEffect } from 'preact/hooks';
import { bytes, get, post, seg, subscribe } from '../api.js';
import { href, useAction, useLoad } from '../hooks.js';
import { ErrorLine, Section, State, Table } from '../components/ui.jsx';

export function VmButtons({ vm, onDone }) {
  const [run, busy, error] = useAction();
  const act = (verb) =>
    run(async () => {
      const result = await post(`/vms/${seg(vm.id)}/${verb}`);
      if (onDone) onDone(result);
    });
  const up = vm.state === 'running' || vm.state === 'paused' || vm.state === 'starting';
  return (
    <span class="buttons">
      {up ? (
        <>
          <button disabled={busy} onClick={() => act('stop')}>
            Stop
          </button>
          <button class="danger" disabled={busy} onClick={() => act('kill')}>
            Kill
          </button>
        </>
      ) : (
        <button disabled={busy} onClick={() => act('start')}>
          Start
        </button>
      )}
      <ErrorLine error={error} />
    </span>
  );
}

export function Vms() {
  const vms = useLoad(() => get('/vms'), []);
  const disks = useLoad(() => get('/disks'), []);
  const isos = useLoad(() => get('/isos'), []);
  useEffect(
    () =>
      subscribe('vm', (event) => {
        let known = false;
        vms.setData((rows) => {
          known = (rows || []).some((v) => v.id === event.id);
          return (rows || []).map((v) => (v.id === event.id ? { ...v, state: event.state } : v));
        });
        if (!known || event.state === 'deleted') vms.reload();
      }),
    [],
  );
  const columns = [
    ['Name', (v) => <a href={href('vms', v.id)}>{v.name}</a>],
    ['State', (v) => <State state={v.state} />],
    ['vCPUs', (v) => v.definition?.cpu?.sockets * v.definition?.cpu?.cores * v.definition?.cpu?.threads || ''],
    ['Memory', (v) => `${v.definition?.memoryMib} MiB`],
    ['', (v) => <VmButtons vm={v} />],
  ];
  return (
    <>
      <Section title="VMs">
        <ErrorLine error={vms.error} />
        <Table testId="vms" columns={columns} rows={vms.data} rowKey={(v) => v.id} empty="No VM is defined (viv vm create)." />
      </Section>
      <Section title="Disks">
        <ErrorLine error={disks.error} />
        <Table
          columns={[
            ['Name', (d) => d.name],
            ['Format', (d) => d.format],
            ['Size', (d) => bytes(d.virtualSize)],
            ['On disk', (d) => bytes(d.actualSize)],
            ['Backing', (d) => d.backing || ''],
            ['Used by', (d) => (d.usedBy || []).join(', ')],
          ]}
          rows={disks.data}
          rowKey={(d) => d.name}
          empty="No disk."
        />
      </Section>
      <Section title="ISOs">
        <ErrorLine error={isos.error} />
        <Table
          columns={[
            ['Name', (i) => i.name],
            ['Size', (i) => bytes(i.size)],
            ['Used by', (i) => (i.usedBy || []).join(', ')],
          ]}
          rows={isos.data}
          rowKey={(i) => i.name}
          empty="No ISO."
        />
      </Section>
    </>
  );
}
