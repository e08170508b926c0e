// The shell: asks the server whether this browser has a session, shows the sign-in form or the
// navigation and the page the hash names.
import { useEffect, useState } from 'preact/hooks';
import { closeEvents, del, get, onSignedOut } from './api.js';
import { href, useRoute } from './hooks.js';
import { SignIn } from './pages/SignIn.jsx';
import { Sandboxes } from './pages/Sandboxes.jsx';
import { Sandbox } from './pages/Sandbox.jsx';
import { Templates } from './pages/Templates.jsx';
import { Snapshots } from './pages/Snapshots.jsx';
import { Vms } from './pages/Vms.jsx';
import { Vm } from './pages/Vm.jsx';
import { Host } from './pages/Host.jsx';

const PAGES = [
  ['sandboxes', 'Sandboxes'],
  ['templates', 'Templates'],
  ['snapshots', 'Snapshots'],
  ['vms', 'VMs'],
  ['host', 'Host'],
];

function Page({ route }) {
  const [page, id] = route;
  switch (page) {
    case 'templates':
      return <Templates />;
    case 'snapshots':
      return <Snapshots />;
    case 'vms':
      return id ? <Vm id={id} /> : <Vms />;
    case 'host':
      return <Host />;
    case 'sandboxes':
    default:
      return id ? <Sandbox id={id} /> : <Sandboxes />;
  }
}

export function App() {
  // undefined: asking; null: signed out; else the session.
  const [session, setSession] = useState(undefined);
  const route = useRoute();
  useEffect(() => {
    get('/auth/session').then(setSession, () => setSession(null));
    return onSignedOut(() => {
      closeEvents();
      setSession(null);
    });
  }, []);
  if (session === undefined) return <p class="empty">Loading…</p>;
  if (session === null) return <SignIn onSignedIn={setSession} />;
  const signOut = async () => {
    try {
      await del('/auth/session');
    } finally {
      closeEvents();
      setSession(null);
    }
  };
  return (
    <div class="shell">
      <header class="top">
        <a class="brand" href={href('sandboxes')}>
          Vivarium
        </a>
        <nav>
          {PAGES.map(([key, title]) => (
            <a key={key} href={href(key)} class={(route[0] || 'sandboxes') === key ? 'on' : ''}>
              {title}
            </a>
          ))}
        </nav>
        <button class="link" onClick={signOut} data-testid="sign-out">
          Sign out
        </button>
      </header>
      <main>
        <Page route={route} />
      </main>
    </div>
  );
}
