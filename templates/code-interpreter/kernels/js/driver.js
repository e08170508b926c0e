'use strict';
/**
 * The Node.js side of the javascript and typescript kernels (driven by kernels/childkernel.py).
 *
 * Usage: node driver.js --lang js|ts --typescript DIR [--typescript-cache FILE] [--global-modules DIR]
 * Protocol (see childkernel.py): requests "OP BASE64" on stdin, JSON answers on the fd named by
 * VIV_KERNEL_FD, user output on fd 1 / fd 2.
 *
 * Invariants:
 * - all cells run in this process's main context, so state persists: top-level declarations
 *   (var/let/const/function/class/import) are rewritten (kernels/js/rewrite.js) into globals that
 *   later cells see and may declare again;
 * - a cell without top-level await runs synchronously with breakOnSigint (SIGINT stops even an
 *   infinite loop); a cell with top-level await runs as an async function, and SIGINT abandons
 *   the wait; a synchronous loop after an await cannot be stopped here (childkernel.py then
 *   restarts this process);
 * - stdout/stderr are flushed (their queued writes reached the pipes) before a result or "done"
 *   is sent, so output always precedes them;
 * - a result is text/plain (util.inspect, bounded depth/length); an object with a method
 *   [Symbol.for('vivarium.mimebundle')]() adds the MIME bundle that method returns;
 * - every request gets exactly one "done", whatever the code throws (non-Error values too);
 * - uncaught exceptions and unhandled rejections from background callbacks are printed to stderr
 *   and never end the process; only process.exit() or stdin EOF do.
 */
const fs = require('fs');
const path = require('path');
const util = require('util');
const vm = require('vm');
const Module = require('module');
const readline = require('readline');
const { pathToFileURL } = require('url');
const { rewriteCell } = require('./rewrite');
const { loadTypeScript } = require('./tsload');

const options = parseArgs(process.argv.slice(2));
const ts = loadTypeScript(options.typescript, options.typescriptCache);
const protocolFd = Number(process.env.VIV_KERNEL_FD);
delete process.env.VIV_KERNEL_FD;
const stringify = JSON.stringify;
const inspect = util.inspect;
const DRIVER_DIR = __dirname;
const MAX_ERROR_TEXT = 100000; // characters of an error's name, message or stack that are reported

function parseArgs(argv) {
  const parsed = { lang: 'js', typescript: 'typescript', typescriptCache: '', globalModules: '' };
  for (let i = 0; i + 1 < argv.length; i += 2) {
    if (argv[i] === '--lang') parsed.lang = argv[i + 1];
    else if (argv[i] === '--typescript') parsed.typescript = argv[i + 1];
    else if (argv[i] === '--typescript-cache') parsed.typescriptCache = argv[i + 1];
    else if (argv[i] === '--global-modules') parsed.globalModules = argv[i + 1];
  }
  return parsed;
}

/** Writes one JSON answer line, looping over partial writes. */
function send(message) {
  const buffer = Buffer.from(stringify(message) + '\n');
  let offset = 0;
  while (offset < buffer.length) offset += fs.writeSync(protocolFd, buffer, offset);
}

// --- module loading for user code -------------------------------------------------------------
function requireFrom(dir) {
  return Module.createRequire(path.join(dir, '[kernel]'));
}

/** require() resolving from the current directory first, then the global npm modules. */
function userRequire(id) {
  try {
    return requireFrom(process.cwd())(id);
  } catch (err) {
    if (err && err.code === 'MODULE_NOT_FOUND' && options.globalModules) {
      try { return requireFrom(options.globalModules)(id); } catch (_) { /* report the first */ }
    }
    throw err;
  }
}
userRequire.resolve = (id) => {
  try {
    return requireFrom(process.cwd()).resolve(id);
  } catch (err) {
    if (options.globalModules) {
      try { return requireFrom(options.globalModules).resolve(id); } catch (_) { /* first */ }
    }
    throw err;
  }
};
userRequire.cache = require.cache;

/** import(specifier) from user code: resolved like require, loaded as ESM or CommonJS. */
function userImport(specifier) {
  let target = specifier;
  try {
    const resolved = userRequire.resolve(specifier);
    target = path.isAbsolute(resolved) ? pathToFileURL(resolved).href : resolved;
  } catch (_) { /* let import() report it */ }
  return import(target);
}

/** The default export of a required module, as ESM-CommonJS interop defines it. */
function defaultExport(mod) {
  return mod && mod.__esModule ? mod.default : mod;
}

Object.defineProperties(globalThis, {
  require: { value: userRequire, writable: true, configurable: true },
  __vivImport: { value: userRequire },
  __vivDefault: { value: defaultExport },
  __vivDynamicImport: { value: userImport },
});

// --- running cells ------------------------------------------------------------------------------
let cellNumber = 0;
let cancelWait = null; // set while a top-level-await cell is awaited; SIGINT calls it

process.on('SIGINT', () => { if (cancelWait) cancelWait(); });
process.on('uncaughtException', (err) => reportBackground('Uncaught', err));
process.on('unhandledRejection', (err) => reportBackground('Unhandled rejection', err));

function reportBackground(what, err) {
  try {
    process.stderr.write(`${what}: ${describe(err).traceback.join('\n')}\n`);
  } catch (_) { /* stderr gone: nothing left to tell */ }
}

/** ename/evalue/traceback of any thrown value. */
function describe(err) {
  try {
    if (err !== null && typeof err === 'object' && typeof err.stack === 'string') {
      const name = String(err.name || 'Error').slice(0, MAX_ERROR_TEXT);
      const message = String(err.message === undefined ? '' : err.message).slice(0, MAX_ERROR_TEXT);
      const lines = err.stack.slice(0, MAX_ERROR_TEXT).split('\n').filter((line) => !isInternalFrame(line));
      return { ename: name, evalue: message, traceback: lines };
    }
    const text = inspect(err, { maxStringLength: MAX_ERROR_TEXT });
    return { ename: 'Uncaught', evalue: text, traceback: [`Uncaught ${text}`] };
  } catch (_) {
    return { ename: 'Error', evalue: 'an error that cannot be described', traceback: [] };
  }
}

function isInternalFrame(line) {
  return /^\s+at /.test(line) && (line.includes(DRIVER_DIR) || /[( ]node:/.test(line));
}

function compileOptions(filename) {
  return { filename };
}

/** The JavaScript to run for a cell, or a SyntaxError-like description. */
function toJavaScript(code) {
  if (options.lang !== 'ts') return { js: code };
  const out = ts.transpileModule(code, {
    compilerOptions: {
      target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.ESNext,
      verbatimModuleSyntax: true, sourceMap: false, inlineSourceMap: false,
    },
    reportDiagnostics: true, fileName: 'cell.ts',
  });
  if (out.diagnostics && out.diagnostics.length) {
    const lines = out.diagnostics.map((d) => {
      const text = ts.flattenDiagnosticMessageText(d.messageText, '\n');
      if (d.file === undefined || d.start === undefined) return text;
      const { line, character } = d.file.getLineAndCharacterOfPosition(d.start);
      return `cell.ts(${line + 1},${character + 1}): ${text}`;
    });
    return { error: { ename: 'SyntaxError', evalue: lines[0], traceback: lines } };
  }
  return { js: out.outputText };
}

async function execute(code) {
  cellNumber += 1;
  const filename = `cell${cellNumber}.${options.lang}`;
  const converted = toJavaScript(code);
  if (converted.error) return send({ type: 'error', ...converted.error });
  const cell = rewriteCell(ts, converted.js);
  let value;
  try {
    if (cell.declare) vm.runInThisContext(cell.declare, compileOptions(filename));
    const script = new vm.Script(cell.body, compileOptions(filename));
    value = script.runInThisContext({ breakOnSigint: true, displayErrors: false });
    if (cell.async) value = ((await interruptible(value)) || {}).value;
  } catch (err) {
    return send({ type: 'error', ...describe(err) });
  }
  if (cell.hasResult && value !== undefined) {
    const data = mimeBundle(value);
    await flushed(process.stdout);
    await flushed(process.stderr);
    send({ type: 'result', data });
  }
}

/** Resolves once everything written to the stream so far has reached its pipe. */
function flushed(stream) {
  if (!stream.writableLength) return Promise.resolve();
  return new Promise((resolve) => {
    try { stream.write('', () => resolve()); } catch (_) { resolve(); }
  });
}

/** Awaits the async cell's promise unless SIGINT arrives first. */
function interruptible(promise) {
  return new Promise((resolve, reject) => {
    cancelWait = () => {
      const err = new Error('Script execution was interrupted by `SIGINT`');
      err.code = 'ERR_SCRIPT_EXECUTION_INTERRUPTED';
      reject(err);
    };
    Promise.resolve(promise).then(resolve, reject);
  }).finally(() => { cancelWait = null; });
}

function mimeBundle(value) {
  let text;
  try {
    text = inspect(value, { depth: 4, maxArrayLength: 200, maxStringLength: 100000, breakLength: 100 });
  } catch (err) {
    text = `[value that cannot be inspected: ${describe(err).evalue}]`;
  }
  const bundle = { 'text/plain': text };
  try {
    const rich = value !== null && typeof value === 'object'
      ? value[Symbol.for('vivarium.mimebundle')] : undefined;
    if (typeof rich === 'function') Object.assign(bundle, rich.call(value));
  } catch (_) { /* a broken rich form still leaves text/plain */ }
  return bundle;
}

function isComplete(code) {
  const source = ts.createSourceFile('cell.ts', code, ts.ScriptTarget.Latest, false,
    options.lang === 'ts' ? ts.ScriptKind.TS : ts.ScriptKind.JS);
  const diagnostics = source.parseDiagnostics || [];
  if (!diagnostics.length) return 'complete';
  const end = code.trimEnd().length;
  return diagnostics.some((d) => d.start + d.length >= end) ? 'incomplete' : 'invalid';
}

// --- the request loop ---------------------------------------------------------------------------
const requests = [];
let busy = false;

async function serve() {
  if (busy) return;
  busy = true;
  while (requests.length) {
    const line = requests.shift();
    const space = line.indexOf(' ');
    const op = space < 0 ? line : line.slice(0, space);
    const code = space < 0 ? '' : Buffer.from(line.slice(space + 1), 'base64').toString('utf8');
    try {
      if (op === 'execute') await execute(code);
      else if (op === 'is_complete') send({ type: 'is_complete', status: isComplete(code) });
    } catch (err) {
      send({ type: 'error', ...describe(err) });
    }
    await flushed(process.stdout);
    await flushed(process.stderr);
    send({ type: 'done' });
  }
  busy = false;
}

const input = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
input.on('line', (line) => { requests.push(line); serve(); });
input.on('close', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
send({ type: 'ready' });
