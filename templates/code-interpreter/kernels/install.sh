#!/bin/sh
# Installs the javascript, typescript, java, r and bash kernel specs under
# /usr/local/share/jupyter/kernels (python3's comes with ipykernel's pip package).
# Runs as root in the guest after the package steps (node, npm's global typescript, the JDK, R,
# IRkernel and the pip packages are installed). Also compiles the java kernel's JShell driver and
# dumps a class data sharing archive of a trained run of it, which roughly halves the JVM's
# start-up + first-snippet time. Idempotent: rerunning overwrites everything it wrote.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
DEST=/usr/local/share/jupyter/kernels
PYTHON=$(command -v python3)
NODE=$(command -v node)
JAVA=$(command -v java)
GLOBAL_MODULES=$(npm root -g)
JAR="$HERE/java/vivjshell.jar"
CDS="$HERE/java/vivjshell.jsa"
TS_CACHE="$HERE/js/typescript.cache"

test -f "$GLOBAL_MODULES/typescript/package.json" || { echo "typescript is not installed globally" >&2; exit 1; }

BUILD=$(mktemp -d)
rm -f "$JAR" "$CDS" "$TS_CACHE"
javac -nowarn -XDignore.symbol.file -d "$BUILD" "$HERE/java/VivJShell.java"
jar --create --file "$JAR" -C "$BUILD" .
rm -rf "$BUILD"

# Train the JVM on a few snippets and archive the classes it loaded (JDK 17 dynamic CDS).
request() { printf 'execute %s\n' "$(printf '%s' "$1" | base64 -w0)"; }
{
    request 'int x = 1 + 1;'
    request 'String s = "a" + x; System.out.println(s); s'
    request 'import java.util.*; List<Integer> l = new ArrayList<>(List.of(3, 1, 2)); Collections.sort(l); l'
    request 'void f() { throw new IllegalStateException("x"); } f();'
    request 'undefinedName + 1'
} | VIV_KERNEL_FD=3 $("$PYTHON" "$HERE/specs.py" --print-cds-dump-command "$CDS" --java "$JAVA" \
    --java-classpath "$JAR") 3>/dev/null >/dev/null 2>&1 || true
if ! test -s "$CDS"; then
    echo "warning: no class data sharing archive for the java kernel (it still works, slower)" >&2
    CDS=""
fi

# A V8 code cache of the TypeScript compiler, which the javascript/typescript kernels load at start.
"$NODE" "$HERE/js/tsload.js" "$GLOBAL_MODULES/typescript" "$TS_CACHE"

# pip installed the packages without byte-code and the kernels run as a user who cannot write
# __pycache__ there, so every kernel start would compile ipykernel & co. from source (about 5 s
# under emulation): compile the modules the kernels import (python3's ipykernel included).
"$PYTHON" -c '
import py_compile, sys
import bash_kernel.kernel, ipykernel.ipkernel, ipykernel.kernelapp, jupyter_client
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None) or ""
    if path.endswith(".py") and "-packages/" in path:
        try:
            py_compile.compile(path, doraise=True)
        except (OSError, py_compile.PyCompileError) as exc:
            print("not compiled:", path, exc, file=sys.stderr)
'
"$PYTHON" -m compileall -q "$HERE"
chmod -R a+rX "$HERE"

"$PYTHON" "$HERE/specs.py" --dest "$DEST" --python "$PYTHON" --node "$NODE" \
    --typescript "$GLOBAL_MODULES/typescript" --typescript-cache "$TS_CACHE" --global-modules "$GLOBAL_MODULES" \
    --java "$JAVA" --java-classpath "$JAR" --java-cds "$CDS" --r "$(command -v R)"
chmod -R a+rX "$DEST"
echo "kernels installed in $DEST: $(ls "$DEST" | tr '\n' ' ')"
