// Sign-in with an API key: the key goes to POST /auth/session once and is never kept or shown;
// the server answers with an HttpOnly session cookie.
import { useState } from 'preact/hooks';
import { post } from '../api.js';
import { useAction } from '../hooks.js';
import { ErrorLine } from '../components/ui.jsx';

export function SignIn({ onSignedIn }) {
  const [key, setKey] = useState('');
  const [run, busy, error] = useAction();
  const submit = (e) => {
    e.preventDefault();
    run(async () => {
      const session = await post('/auth/session', { apiKey: key.trim() });
      setKey('');
      onSignedIn(session);
    });
  };
  return (
    <main class="signin">
      <form class="card" onSubmit={submit}>
        <h1>Vivarium</h1>
        <label>
          API key
          <input type="password" name="apiKey" autocomplete="current-password" value={key} onInput={(e) => setKey(e.target.value)} required />
        </label>
        <button type="submit" disabled={busy}>
          Sign in
        </button>
        <ErrorLine error={error} />
      </form>
    </main>
  );
}
