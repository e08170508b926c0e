// Small presentational pieces shared by the pages.

/** An API error as the API words it. */
export function ErrorLine({ error }) {
  if (!error) return null;
  return (
    <p class="error" role="alert">
      {error.message}
    </p>
  );
}

/** A titled section. */
export function Section({ title, actions, children }) {
  return (
    <section class="card">
      <header>
        <h2>{title}</h2>
        <div class="actions">{actions}</div>
      </header>
      {children}
    </section>
  );
}

/** A table of rows: columns are [title, row => cell]. */
export function Table({ columns, rows, empty = 'Nothing here yet.', rowKey, testId }) {
  if (!rows || rows.length === 0) return <p class="empty">{empty}</p>;
  return (
    <div class="table-wrap">
      <table data-testid={testId}>
        <thead>
          <tr>
            {columns.map(([title]) => (
              <th key={title}>{title}</th>
            ))}
          </tr>
        </thead>
        <tbody>
          {rows.map((row) => (
            <tr key={rowKey(row)} data-key={rowKey(row)}>
              {columns.map(([title, cell]) => (
                <td key={title} data-label={title}>
                  {cell(row)}
                </td>
              ))}
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

/** A state badge. */
export function State({ state }) {
  return <span class={`state state-${state}`}>{state}</span>;
}

/** Tabs: `tabs` is [[key, title]], `value` the current key. */
export function Tabs({ tabs, value, onChange }) {
  return (
    <nav class="tabs" role="tablist">
      {tabs.map(([key, title]) => (
        <button key={key} role="tab" aria-selected={key === value} class={key === value ? 'on' : ''} onClick={() => onChange(key)}>
          {title}
        </button>
      ))}
    </nav>
  );
}
