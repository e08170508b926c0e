// One VM: its facts, start/stop, and its consoles in the page: the serial console (xterm.js
// over /vms/{id}/console) and the graphical display (noVNC over /vms/{id}/vnc).
import { useEffect, useRef, useState } from 'preact/hooks';
import RFB from '@novnc/novnc/lib/rfb.js';
import { get, seg, socket, subscribe } from '../api.js';
import { useLoad } from '../hooks.js';
import { ErrorLine, Section, State, Tabs } from '../components/ui.jsx';
import { Terminal } from '../components/Terminal.jsx';
import { VmButtons } from './Vms.jsx';

function Display({ id }) {
  const host = useRef(null);
  const [status, setStatus] = useState('connecting');
  useEffect(() => {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const rfb = new RFB(host.current, `${scheme}//${location.host}/vms/${seg(id)}/vnc`, { wsProtocols: ['binary'] });
    rfb.scaleViewport = true;
    rfb.addEventListener('connect', () => setStatus('connected'));
    rfb.addEventListener('disconnect', (e) => setStatus(e.detail.clean ? 'disconnected' : 'connection lost'));
    return () => rfb.disconnect();
  }, [id]);
  return (
    <div>
      <div class="terminal-status" data-testid="vnc-status">
        display {status}
      </div>
      <div class="vnc" ref={host} data-testid="vnc" />
    </div>
  );
}

export function Vm({ id }) {
  const vm = useLoad(() => get(`/vms/${seg(id)}`), [id]);
  const [tab, setTab] = useState('serial');
  useEffect(
    () =>
      subscribe('vm', (event) => {
        if (event.id === vm.data?.id || event.name === id) vm.reload();
      }),
    [id, vm.data?.id],
  );
  const v = vm.data;
  const running = v && (v.state === 'running' || v.state === 'paused');
  const tabs = [['serial', 'Serial console']];
  if (v?.definition?.display && v.definition.display !== 'none') tabs.push(['display', 'Display']);
  return (
    <>
      <Section title={`VM ${v?.name || id}`} actions={v && <VmButtons vm={v} onDone={vm.reload} />}>
        <ErrorLine error={vm.error} />
        {v && (
          <dl class="facts">
            <dt>State</dt>
            <dd data-testid="vm-state">
              <State state={v.state} />
            </dd>
            <dt>Memory</dt>
            <dd>{v.definition.memoryMib} MiB</dd>
            <dt>Disks</dt>
            <dd>{v.definition.disks.map((d) => d.disk || d.name).join(', ') || 'none'}</dd>
            <dt>CD-ROMs</dt>
            <dd>{v.definition.cdroms.map((c) => c.iso || 'empty').join(', ') || 'none'}</dd>
            <dt>Started</dt>
            <dd>{v.startedAt ? new Date(v.startedAt).toLocaleString() : ''}</dd>
            {v.lastExit && (
              <>
                <dt>Last exit</dt>
                <dd>{v.lastExit}</dd>
              </>
            )}
          </dl>
        )}
      </Section>
      {running && (
        <Section title="">
          <Tabs tabs={tabs} value={tab} onChange={setTab} />
          {tab === 'serial' && <Terminal key={`serial-${v.id}`} label="serial" open={() => socket(`/vms/${seg(v.id)}/console`, ['viv-console'])} />}
          {tab === 'display' && <Display id={v.id} />}
        </Section>
      )}
    </>
  );
}
