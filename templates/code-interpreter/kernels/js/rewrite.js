'use strict';
/**
 * Rewrites one notebook cell of JavaScript so that it can run in the kernel's persistent context.
 *
 * rewriteCell(ts, code) -> { declare, body, async, hasResult }
 * - declare: a script `var a, b;` naming every top-level binding the cell declares (run first, so
 *   the bindings become globals that later cells see and may declare again);
 * - body: the cell with each top-level let/const/var/class/import turned into assignments to
 *   those globals; ESM imports become __vivImport()/__vivDefault() calls (see driver.js);
 * - async: true when the cell uses top-level await; the body is then an async arrow function
 *   call whose promise resolves to `{ value }` of the last expression statement, with function
 *   declarations moved to its start (they keep their hoisting);
 * - dynamic import(x) calls anywhere become __vivDynamicImport(x);
 * - hasResult: the cell's value is its result: for a synchronous body, the script's completion
 *   value unless the cell ends with a declaration; for an async body, the value of a final
 *   expression statement.
 * Invariants: code the TypeScript parser rejects is returned unchanged (V8 then reports the
 * syntax error itself); every replacement starts with `;` so that automatic semicolon insertion
 * after the previous statement is unaffected.
 */

function rewriteCell(ts, code) {
  if (/\bimport\s*\(/.test(code)) code = replaceDynamicImports(ts, code);
  const source = ts.createSourceFile('cell.js', code, ts.ScriptTarget.Latest, true, ts.ScriptKind.JS);
  if ((source.parseDiagnostics || []).length) {
    return { declare: '', body: code, async: false, hasResult: true };
  }
  const text = (node) => code.slice(node.getStart(source), node.end);
  const statements = source.statements;
  const isAsync = statements.some((statement) => hasTopLevelAwait(ts, statement));
  const names = new Set();
  const hoisted = [];
  const edits = [];
  const replace = (node, replacement) => edits.push({ start: node.getStart(source), end: node.end, replacement });
  let hasResult = false;

  statements.forEach((statement, index) => {
    const last = index === statements.length - 1;
    if (ts.isVariableStatement(statement)) {
      replace(statement, declarationAssignments(ts, statement, text, names));
    } else if (ts.isFunctionDeclaration(statement) && statement.name && statement.body) {
      names.add(statement.name.text);
      const declaration = withoutExport(ts, statement, code, source);
      if (isAsync) {
        hoisted.push(`${statement.name.text} = ${declaration};`);
        replace(statement, '');
      } else if (declaration.length !== statement.end - statement.getStart(source)) {
        replace(statement, declaration);
      }
    } else if (ts.isClassDeclaration(statement) && statement.name) {
      names.add(statement.name.text);
      replace(statement, `;${statement.name.text} = ${withoutExport(ts, statement, code, source)};`);
    } else if (ts.isImportDeclaration(statement)) {
      replace(statement, importAssignments(ts, statement, text, names));
    } else if (ts.isExportDeclaration(statement)) {
      replace(statement, '');
    } else if (ts.isExportAssignment(statement) || ts.isExpressionStatement(statement)) {
      const expression = text(statement.expression);
      if (last) {
        hasResult = true;
        replace(statement, isAsync ? `;return { value: (${expression}\n) };` : `;(${expression}\n);`);
      } else if (ts.isExportAssignment(statement)) {
        replace(statement, `;(${expression}\n);`);
      }
    }
  });

  const lastStatement = statements[statements.length - 1];
  if (!isAsync && lastStatement && !isDeclaration(ts, lastStatement)) {
    hasResult = true; // if/try/for/blocks: the script's completion value, as in Node's REPL
  }
  let body = code;
  for (const edit of edits.sort((a, b) => b.start - a.start)) {
    body = body.slice(0, edit.start) + edit.replacement + body.slice(edit.end);
  }
  if (isAsync) body = `(async () => {\n${hoisted.join('\n')}\n${body}\n})()`;
  const declare = names.size ? `var ${[...names].join(', ')};` : '';
  return { declare, body, async: isAsync, hasResult };
}

/** Every `import(x)` call -> `__vivDynamicImport(x)` (vm scripts cannot import() themselves). */
function replaceDynamicImports(ts, code) {
  const source = ts.createSourceFile('cell.js', code, ts.ScriptTarget.Latest, true, ts.ScriptKind.JS);
  const starts = [];
  const visit = (node) => {
    if (ts.isCallExpression(node) && node.expression.kind === ts.SyntaxKind.ImportKeyword) {
      starts.push(node.expression.getStart(source));
    }
    ts.forEachChild(node, visit);
  };
  visit(source);
  for (const start of starts.sort((a, b) => b - a)) {
    code = code.slice(0, start) + '__vivDynamicImport' + code.slice(start + 'import'.length);
  }
  return code;
}

/** `const {a} = o, b = 1;` -> `;({a} = o); (b = 1);` and records a, b. */
function declarationAssignments(ts, statement, text, names) {
  const list = statement.declarationList;
  const lexical = (list.flags & (ts.NodeFlags.Let | ts.NodeFlags.Const)) !== 0;
  const parts = [];
  for (const declaration of list.declarations) {
    collectNames(ts, declaration.name, names);
    if (declaration.initializer) {
      parts.push(`(${text(declaration.name)} = ${text(declaration.initializer)}\n);`);
    } else if (lexical) {
      parts.push(`(${text(declaration.name)} = undefined);`);
    }
  }
  return ';' + parts.join(' ');
}

/** `import d, {a as b} from 'm'` -> a block assigning d and b from __vivImport('m'). */
function importAssignments(ts, statement, text, names) {
  const specifier = text(statement.moduleSpecifier);
  const clause = statement.importClause;
  if (!clause) return `;__vivImport(${specifier});`;
  const assignments = [];
  if (clause.name) {
    names.add(clause.name.text);
    assignments.push(`${clause.name.text} = __vivDefault(__module);`);
  }
  const bindings = clause.namedBindings;
  if (bindings && ts.isNamespaceImport(bindings)) {
    names.add(bindings.name.text);
    assignments.push(`${bindings.name.text} = __module;`);
  } else if (bindings) {
    for (const element of bindings.elements) {
      if (element.isTypeOnly) continue;
      const imported = (element.propertyName || element.name).text;
      names.add(element.name.text);
      assignments.push(imported === 'default'
        ? `${element.name.text} = __vivDefault(__module);`
        : `${element.name.text} = __module[${JSON.stringify(imported)}];`);
    }
  }
  return `;{ const __module = __vivImport(${specifier}); ${assignments.join(' ')} }`;
}

function collectNames(ts, name, names) {
  if (ts.isIdentifier(name)) {
    names.add(name.text);
    return;
  }
  for (const element of name.elements) {
    if (!ts.isOmittedExpression(element)) collectNames(ts, element.name, names);
  }
}

/** The declaration's text without `export` / `export default`. */
function withoutExport(ts, node, code, source) {
  let start = node.getStart(source);
  for (const modifier of node.modifiers || []) {
    if (modifier.kind === ts.SyntaxKind.ExportKeyword || modifier.kind === ts.SyntaxKind.DefaultKeyword) {
      start = modifier.end;
    }
  }
  return code.slice(start, node.end).trim();
}

function isDeclaration(ts, node) {
  return ts.isVariableStatement(node) || ts.isFunctionDeclaration(node) || ts.isClassDeclaration(node)
    || ts.isImportDeclaration(node) || ts.isExportDeclaration(node);
}

function hasTopLevelAwait(ts, node) {
  if (ts.isFunctionLike(node)) return false;
  if (node.kind === ts.SyntaxKind.AwaitExpression) return true;
  if (ts.isForOfStatement(node) && node.awaitModifier) return true;
  return ts.forEachChild(node, (child) => hasTopLevelAwait(ts, child)) || false;
}

module.exports = { rewriteCell };
