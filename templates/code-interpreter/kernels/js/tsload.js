'use strict';
/**
 * Loads the TypeScript compiler (about 9 MB of JavaScript) with a V8 code cache, which makes the
 * javascript/typescript kernels start about three times faster than a plain require().
 *
 * loadTypeScript(dir, cacheFile) -> the `typescript` module of package directory DIR; uses
 * CACHEFILE when it exists (V8 rejects a cache made by another Node/V8 build or with other flags,
 * and the module then just compiles from source).
 * `node tsload.js DIR CACHEFILE` writes the cache (install.sh runs it at template build time,
 * with the guest's own node) after exercising the parser and transpiler, so the functions the
 * kernels use are compiled into it.
 */
const fs = require('fs');
const path = require('path');
const vm = require('vm');
const Module = require('module');

function compileTypeScript(dir, cachedData) {
  const file = require.resolve(dir);
  const source = fs.readFileSync(file, 'utf8');
  const script = new vm.Script(Module.wrap(source), { filename: file, cachedData });
  const module = { exports: {} };
  const moduleRequire = Module.createRequire(file);
  script.runInThisContext()(module.exports, moduleRequire, module, file, path.dirname(file));
  return { ts: module.exports, script };
}

function loadTypeScript(dir, cacheFile) {
  let cachedData;
  try {
    if (cacheFile) cachedData = fs.readFileSync(cacheFile);
  } catch (_) { /* no cache: compile from source */ }
  return compileTypeScript(dir, cachedData).ts;
}

function writeCache(dir, cacheFile) {
  const { ts, script } = compileTypeScript(dir, undefined);
  ts.transpileModule('const x: number = await Promise.resolve(1); x', {
    compilerOptions: { target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.ESNext, verbatimModuleSyntax: true },
    reportDiagnostics: true,
  });
  const source = ts.createSourceFile('cell.js', 'import a from "a"; let {b} = a; class C {}', ts.ScriptTarget.Latest, true, ts.ScriptKind.JS);
  ts.forEachChild(source, () => undefined);
  fs.writeFileSync(cacheFile, script.createCachedData());
}

if (require.main === module) {
  if (process.argv.length !== 4) {
    process.stderr.write('usage: node tsload.js TYPESCRIPT_DIR CACHE_FILE\n');
    process.exit(2);
  }
  writeCache(process.argv[2], process.argv[3]);
}

module.exports = { loadTypeScript };
