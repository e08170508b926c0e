// A time series chart (uPlot): `series` is [[label, values]], `times` seconds since the epoch.
import { useEffect, useRef } from 'preact/hooks';
import uPlot from 'uplot';
import 'uplot/dist/uPlot.min.css';

const COLORS = ['#2563eb', '#dc2626', '#16a34a', '#9333ea'];

export function Chart({ title, times, series, unit }) {
  const host = useRef(null);
  useEffect(() => {
    const width = Math.max(240, host.current.clientWidth);
    const plot = new uPlot(
      {
        title,
        width,
        height: 200,
        series: [{}, ...series.map(([label], i) => ({ label, stroke: COLORS[i % COLORS.length], width: 2 }))],
        axes: [{}, { size: 72, values: (_, ticks) => ticks.map((v) => `${v}${unit}`) }],
      },
      [times, ...series.map(([, values]) => values)],
      host.current,
    );
    const observer = new ResizeObserver(() => plot.setSize({ width: Math.max(240, host.current.clientWidth), height: 200 }));
    observer.observe(host.current);
    return () => {
      observer.disconnect();
      plot.destroy();
    };
  }, [title, times, series, unit]);
  return <div class="chart" ref={host} />;
}
