// A sandbox's metrics as charts: the server samples every 5 s; this view asks again at that
// pace while it is shown (the history is not in the event stream).
import { useEffect } from 'preact/hooks';
import { get, seg } from '../../api.js';
import { useLoad } from '../../hooks.js';
import { ErrorLine } from '../../components/ui.jsx';
import { Chart } from '../../components/Chart.jsx';

const MiB = 1024 * 1024;

export function Metrics({ id }) {
  const samples = useLoad(() => get(`/sandboxes/${seg(id)}/metrics`), [id]);
  useEffect(() => {
    const t = setInterval(samples.reload, 5000);
    return () => clearInterval(t);
  }, [id]);
  const rows = samples.data || [];
  const times = rows.map((s) => s.timestampUnix);
  return (
    <div data-testid="metrics">
      <ErrorLine error={samples.error} />
      {rows.length < 2 ? (
        <p class="empty">Samples arrive every 5 seconds while the sandbox runs.</p>
      ) : (
        <div class="charts">
          <Chart title="CPU" unit="%" times={times} series={[['CPU used', rows.map((s) => s.cpuUsedPct)]]} />
          <Chart
            title="Memory"
            unit=" MiB"
            times={times}
            series={[
              ['used', rows.map((s) => Math.round(s.memUsed / MiB))],
              ['total', rows.map((s) => Math.round(s.memTotal / MiB))],
            ]}
          />
          <Chart
            title="Disk"
            unit=" MiB"
            times={times}
            series={[
              ['used', rows.map((s) => Math.round(s.diskUsed / MiB))],
              ['total', rows.map((s) => Math.round(s.diskTotal / MiB))],
            ]}
          />
        </div>
      )}
    </div>
  );
}
