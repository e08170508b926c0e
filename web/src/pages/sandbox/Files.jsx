// A sandbox's file browser: list a directory, go into folders, upload with progress,
// download, delete.
import { useState } from 'preact/hooks';
import { bytes, get, post, seg, upload } from '../../api.js';
import { useAction, useLoad } from '../../hooks.js';
import { ErrorLine, Table } from '../../components/ui.jsx';

const join = (dir, name) => (dir.endsWith('/') ? dir : dir + '/') + name;
const parent = (dir) => dir.replace(/\/[^/]+\/?$/, '') || '/';

export function Files({ id }) {
  const [dir, setDir] = useState('/home/user');
  const [input, setInput] = useState('/home/user');
  const list = useLoad(() => get(`/sandboxes/${seg(id)}/files/list?path=${encodeURIComponent(dir)}`), [id, dir]);
  const [run, busy, error] = useAction();
  const [progress, setProgress] = useState(null);
  const go = (path) => {
    setDir(path);
    setInput(path);
  };
  const send = (e) => {
    const file = e.target.files[0];
    e.target.value = '';
    if (!file) return;
    run(async () => {
      setProgress({ name: file.name, pct: 0 });
      try {
        await upload(`/sandboxes/${seg(id)}/files?path=${encodeURIComponent(join(dir, file.name))}`, file, (sent, total) =>
          setProgress({ name: file.name, pct: total ? Math.round((sent * 100) / total) : 0 }),
        );
      } finally {
        setProgress(null);
      }
      list.reload();
    });
  };
  const remove = (entry) =>
    confirm(`Delete ${entry.path}?`) &&
    run(async () => {
      await post(`/sandboxes/${seg(id)}/envd/filesystem.Filesystem/Remove`, { path: entry.path });
      list.reload();
    });
  const entries = (list.data?.entries || []).slice().sort((a, b) => (a.type === b.type ? a.name.localeCompare(b.name) : a.type === 'FILE_TYPE_DIRECTORY' ? -1 : 1));
  const isDir = (e) => e.type === 'FILE_TYPE_DIRECTORY';
  const columns = [
    ['Name', (e) => (isDir(e) ? <a href="#" onClick={(ev) => (ev.preventDefault(), go(e.path))}>{e.name}/</a> : e.name)],
    ['Size', (e) => (isDir(e) ? '' : bytes(Number(e.size)))],
    ['Modified', (e) => (e.modifiedTime ? new Date(e.modifiedTime).toLocaleString() : '')],
    [
      '',
      (e) => (
        <span class="buttons">
          {!isDir(e) && (
            <a class="button" href={`/sandboxes/${seg(id)}/files?path=${encodeURIComponent(e.path)}`} download={e.name}>
              Download
            </a>
          )}
          <button class="danger" onClick={() => remove(e)} disabled={busy}>
            Delete
          </button>
        </span>
      ),
    ],
  ];
  return (
    <div data-testid="files">
      <form class="row" onSubmit={(e) => (e.preventDefault(), go(input))}>
        <button type="button" onClick={() => go(parent(dir))}>
          Up
        </button>
        <input value={input} onInput={(e) => setInput(e.target.value)} aria-label="directory" />
        <button>Open</button>
        <label class="button">
          Upload
          <input type="file" class="hidden" onChange={send} data-testid="upload" />
        </label>
      </form>
      {progress && (
        <p class="note" data-testid="upload-progress">
          Uploading {progress.name}: <progress max="100" value={progress.pct} /> {progress.pct}%
        </p>
      )}
      <ErrorLine error={list.error || error} />
      <Table columns={columns} rows={entries} rowKey={(e) => e.path} empty="Empty directory." testId="file-list" />
    </div>
  );
}
