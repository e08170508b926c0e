// Small hooks shared by the pages: loading data, running actions, the current route.
import { useCallback, useEffect, useState } from 'preact/hooks';

/** Loads `fn()` when `deps` change: { data, error, loading, reload, setData }. */
export function useLoad(fn, deps) {
  const [state, setState] = useState({ data: undefined, error: null, loading: true });
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let live = true;
    setState((s) => ({ ...s, loading: true }));
    fn().then(
      (data) => live && setState({ data, error: null, loading: false }),
      (error) => live && setState((s) => ({ data: s.data, error, loading: false })),
    );
    return () => {
      live = false;
    };
  }, [...deps, tick]);
  const reload = useCallback(() => setTick((t) => t + 1), []);
  const setData = useCallback((f) => setState((s) => ({ ...s, data: f(s.data) })), []);
  return { ...state, reload, setData };
}

/** Runs user actions one at a time: [run(fn), busy, error, clearError]. */
export function useAction() {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const run = useCallback(async (fn) => {
    setBusy(true);
    setError(null);
    try {
      return await fn();
    } catch (e) {
      setError(e);
    } finally {
      setBusy(false);
    }
  }, []);
  return [run, busy, error, () => setError(null)];
}

/** The hash route as path segments: `#/sandboxes/ID` → ['sandboxes', 'ID']. */
export function useRoute() {
  const read = () =>
    location.hash
      .replace(/^#\/?/, '')
      .split('/')
      .filter(Boolean)
      .map(decodeURIComponent);
  const [route, setRoute] = useState(read);
  useEffect(() => {
    const on = () => setRoute(read());
    window.addEventListener('hashchange', on);
    return () => window.removeEventListener('hashchange', on);
  }, []);
  return route;
}

export const href = (...parts) => '#/' + parts.map(encodeURIComponent).join('/');
