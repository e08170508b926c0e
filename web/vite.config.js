// Builds the console into static files (crates/viv-web embeds them). JSX is compiled for Preact
// by esbuild directly, so no framework plugin is needed. Nothing is inlined into the HTML: the
// server's Content-Security-Policy allows scripts from files of this origin only.
import { defineConfig } from 'vite';

export default defineConfig({
  esbuild: { jsx: 'automatic', jsxImportSource: 'preact' },
  build: {
    target: 'es2022',
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    chunkSizeWarningLimit: 2000,
  },
});
