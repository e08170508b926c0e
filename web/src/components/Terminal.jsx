// A terminal (xterm.js) over a WebSocket: binary frames are output, keystrokes go out as binary
// frames. `open(cols, rows)` makes the socket; `onText(message, term)` gets JSON text frames;
// `resize(ws, cols, rows)` tells the other side a new size (optional).
import { useEffect, useRef, useState } from 'preact/hooks';
import { Terminal as XTerm } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import '@xterm/xterm/css/xterm.css';

const encoder = new TextEncoder();

export function Terminal({ open, onText, resize, label }) {
  const host = useRef(null);
  const [status, setStatus] = useState('connecting');
  useEffect(() => {
    const term = new XTerm({ convertEol: false, cursorBlink: true, fontSize: 14, scrollback: 5000 });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(host.current);
    fit.fit();
    const ws = open(term.cols, term.rows);
    ws.onopen = () => setStatus('connected');
    ws.onmessage = (e) => {
      if (typeof e.data === 'string') {
        let msg;
        try {
          msg = JSON.parse(e.data);
        } catch {
          return;
        }
        if (onText) onText(msg, term, setStatus);
      } else {
        term.write(new Uint8Array(e.data));
      }
    };
    ws.onclose = (e) => setStatus((s) => (s.startsWith('error') || s.startsWith('exit') ? s : `closed${e.reason ? `: ${e.reason}` : ''}`));
    const send = (data) => ws.readyState === WebSocket.OPEN && ws.send(encoder.encode(data));
    const input = term.onData(send);
    const binary = term.onBinary((s) => ws.readyState === WebSocket.OPEN && ws.send(Uint8Array.from(s, (c) => c.charCodeAt(0))));
    const sized = term.onResize(({ cols, rows }) => resize && ws.readyState === WebSocket.OPEN && resize(ws, cols, rows));
    const observer = new ResizeObserver(() => fit.fit());
    observer.observe(host.current);
    term.focus();
    return () => {
      observer.disconnect();
      input.dispose();
      binary.dispose();
      sized.dispose();
      ws.close();
      term.dispose();
    };
    // The socket is opened once per mounted terminal.
  }, []);
  return (
    <div class="terminal-box">
      <div class="terminal-status" data-testid="terminal-status">
        {label} {status}
      </div>
      <div class="terminal" ref={host} data-testid="terminal" />
    </div>
  );
}
