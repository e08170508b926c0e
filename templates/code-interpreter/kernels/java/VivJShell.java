/*
 * The JVM side of the java kernel (driven by kernels/childkernel.py): evaluates Java snippets with
 * the JShell API, executing them in this JVM ("local" execution engine, so there is one JVM to
 * start, not two).
 *
 * Protocol (see childkernel.py): requests "OP BASE64" on stdin; JSON answer lines on the pipe
 * whose fd is in the env var VIV_KERNEL_FD; user output is this process's own fd 1 / fd 2.
 *
 * Invariants:
 * - each request is split into snippets with SourceCodeAnalysis.analyzeCompletion and evaluated
 *   in order; the first rejected snippet (compile error) or exception stops the request;
 * - the value of the last snippet, when it is an expression, is the result (text/plain);
 * - System.out/System.err are flushed before every answer line, so output written before a
 *   result or "done" reaches the kernel before it; System.in is empty for user code;
 * - a warm-up snippet is evaluated and dropped before "ready" (it leaves no state behind);
 * - SIGINT calls JShell.stop(), which stops the running snippet (and does nothing when idle);
 * - every request gets exactly one "done".
 */
import java.io.BufferedReader;
import java.io.ByteArrayInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Base64;
import java.util.List;
import java.util.Locale;
import java.util.stream.Collectors;

import jdk.jshell.Diag;
import jdk.jshell.EvalException;
import jdk.jshell.JShell;
import jdk.jshell.JShellException;
import jdk.jshell.Snippet;
import jdk.jshell.SnippetEvent;
import jdk.jshell.SourceCodeAnalysis;
import jdk.jshell.UnresolvedReferenceException;
import jdk.jshell.VarSnippet;

public final class VivJShell {
    private static final int MAX_ERROR_TEXT = 100000; // characters of an exception message reported
    private static final int MAX_FRAMES = 200; // stack frames reported per exception
    private final JShell shell;
    private final OutputStream protocol;

    private VivJShell(OutputStream protocol) {
        this.protocol = protocol;
        this.shell = JShell.builder().executionEngine("local").build();
    }

    public static void main(String[] args) throws IOException {
        String fd = System.getenv("VIV_KERNEL_FD");
        if (fd == null) {
            System.err.println("VivJShell: VIV_KERNEL_FD is not set");
            System.exit(2);
        }
        BufferedReader requests = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        System.setIn(new ByteArrayInputStream(new byte[0]));
        System.setOut(new PrintStream(new FileOutputStream(java.io.FileDescriptor.out), true, StandardCharsets.UTF_8));
        System.setErr(new PrintStream(new FileOutputStream(java.io.FileDescriptor.err), true, StandardCharsets.UTF_8));
        VivJShell kernel = new VivJShell(new FileOutputStream("/proc/self/fd/" + fd));
        sun.misc.Signal.handle(new sun.misc.Signal("INT"), signal -> kernel.shell.stop());
        kernel.warmUp();
        kernel.send("{\"type\":\"ready\"}");
        for (String line; (line = requests.readLine()) != null; ) {
            kernel.serve(line);
        }
        System.exit(0);
    }

    /**
     * Evaluates and drops a snippet, so that the compiler is loaded before the first request
     * (seconds under emulation, overlapping the Python kernel's own start-up).
     */
    private void warmUp() {
        for (SnippetEvent event : shell.eval("int vivWarmUp = 1 + 1;")) {
            shell.drop(event.snippet());
        }
    }

    private void serve(String line) throws IOException {
        int space = line.indexOf(' ');
        String op = space < 0 ? line : line.substring(0, space);
        String code;
        try {
            code = space < 0 ? "" : new String(Base64.getDecoder().decode(line.substring(space + 1)), StandardCharsets.UTF_8);
        } catch (IllegalArgumentException e) {
            code = "";
        }
        try {
            if (op.equals("execute")) {
                execute(code);
            } else if (op.equals("is_complete")) {
                SourceCodeAnalysis.Completeness c = shell.sourceCodeAnalysis().analyzeCompletion(code).completeness();
                String status = c == SourceCodeAnalysis.Completeness.DEFINITELY_INCOMPLETE ? "incomplete" : "complete";
                send("{\"type\":\"is_complete\",\"status\":\"" + status + "\"}");
            }
        } catch (RuntimeException | StackOverflowError e) {
            sendError(e.getClass().getName(), String.valueOf(e.getMessage()), List.of(e.toString()));
        }
        send("{\"type\":\"done\"}");
    }

    private void execute(String code) throws IOException {
        SourceCodeAnalysis analysis = shell.sourceCodeAnalysis();
        String rest = code;
        String result = null;
        while (!rest.isBlank()) {
            SourceCodeAnalysis.CompletionInfo info = analysis.analyzeCompletion(rest);
            SourceCodeAnalysis.Completeness completeness = info.completeness();
            if (completeness == SourceCodeAnalysis.Completeness.EMPTY) {
                break;
            }
            String source = info.source();
            if (!completeness.isComplete() || source == null) {
                source = rest;
                rest = "";
            } else {
                rest = info.remaining();
            }
            Outcome outcome = evaluate(source, completeness.isComplete());
            if (outcome.failed) {
                return;
            }
            result = outcome.value;
        }
        if (result != null) {
            send("{\"type\":\"result\",\"data\":{\"text/plain\":" + json(result) + "}}");
        }
    }

    /** A snippet's evaluation: failed (its error has been sent) or its expression value (or null). */
    private static final class Outcome {
        final boolean failed;
        final String value;

        Outcome(boolean failed, String value) {
            this.failed = failed;
            this.value = value;
        }
    }

    private Outcome evaluate(String source, boolean complete) throws IOException {
        List<SnippetEvent> events = shell.eval(source);
        flushOutput();
        String value = null;
        for (SnippetEvent event : events) {
            if (event.causeSnippet() != null) {
                continue;
            }
            JShellException exception = event.exception();
            if (exception != null) {
                sendException(exception);
                return new Outcome(true, null);
            }
            Snippet snippet = event.snippet();
            if (event.status() == Snippet.Status.REJECTED) {
                sendCompileError(snippet, source, complete);
                return new Outcome(true, null);
            }
            if (event.value() != null && isExpression(snippet)) {
                value = event.value();
            }
        }
        return new Outcome(false, value);
    }

    private static boolean isExpression(Snippet snippet) {
        return snippet.kind() == Snippet.Kind.EXPRESSION
            || (snippet instanceof VarSnippet && snippet.subKind() == Snippet.SubKind.TEMP_VAR_EXPRESSION_SUBKIND);
    }

    private void sendException(JShellException exception) throws IOException {
        if (exception instanceof UnresolvedReferenceException) {
            Snippet snippet = ((UnresolvedReferenceException) exception).getSnippet();
            String missing = shell.unresolvedDependencies((jdk.jshell.DeclarationSnippet) snippet)
                .collect(Collectors.joining(", "));
            String message = "cannot use " + snippet.source().strip() + ": it refers to " + missing
                + ", which is not declared";
            sendError("UnresolvedReferenceException", message, List.of(message));
            return;
        }
        String name = exception instanceof EvalException
            ? ((EvalException) exception).getExceptionClassName() : exception.getClass().getName();
        String message = exception.getMessage() == null ? "" : exception.getMessage();
        if (message.length() > MAX_ERROR_TEXT) {
            message = message.substring(0, MAX_ERROR_TEXT);
        }
        List<String> traceback = new ArrayList<>();
        Throwable current = exception;
        String header = name + (message.isEmpty() ? "" : ": " + message);
        while (current != null) {
            traceback.add(header.length() > MAX_ERROR_TEXT ? header.substring(0, MAX_ERROR_TEXT) : header);
            StackTraceElement[] frames = current.getStackTrace();
            for (int i = 0; i < Math.min(frames.length, MAX_FRAMES); i++) {
                traceback.add("\tat " + frames[i]);
            }
            if (frames.length > MAX_FRAMES) {
                traceback.add("\t... " + (frames.length - MAX_FRAMES) + " more");
            }
            current = current.getCause();
            if (current != null) {
                String causeName = current instanceof EvalException
                    ? ((EvalException) current).getExceptionClassName() : current.getClass().getName();
                header = "Caused by: " + causeName + (current.getMessage() == null ? "" : ": " + current.getMessage());
            }
        }
        sendError(name, message, traceback);
    }

    private void sendCompileError(Snippet snippet, String source, boolean complete) throws IOException {
        List<String> lines = new ArrayList<>();
        List<Diag> diagnostics = shell.diagnostics(snippet).collect(Collectors.toList());
        for (Diag diag : diagnostics) {
            String message = diag.getMessage(Locale.ROOT);
            long position = Math.max(0, Math.min(diag.getStartPosition(), snippet.source().length()));
            String text = snippet.source();
            int lineStart = text.lastIndexOf('\n', (int) position - 1) + 1;
            int lineEnd = text.indexOf('\n', (int) position);
            lines.add((diag.isError() ? "error: " : "warning: ") + message);
            lines.add("    " + text.substring(lineStart, lineEnd < 0 ? text.length() : lineEnd));
            lines.add("    " + " ".repeat((int) position - lineStart) + "^");
        }
        String first = diagnostics.stream().filter(Diag::isError).map(d -> d.getMessage(Locale.ROOT))
            .findFirst().orElse(complete ? "the snippet was rejected" : "incomplete input: " + source.strip());
        if (lines.isEmpty()) {
            lines.add(first);
        }
        sendError("CompilationException", first, lines);
    }

    private void sendError(String name, String message, List<String> traceback) throws IOException {
        String lines = traceback.stream().map(VivJShell::json).collect(Collectors.joining(","));
        send("{\"type\":\"error\",\"ename\":" + json(name) + ",\"evalue\":" + json(message)
            + ",\"traceback\":[" + lines + "]}");
    }

    private static void flushOutput() {
        System.out.flush();
        System.err.flush();
    }

    private void send(String jsonLine) throws IOException {
        flushOutput();
        protocol.write((jsonLine + "\n").getBytes(StandardCharsets.UTF_8));
        protocol.flush();
    }

    /** A JSON string literal; lone surrogates become U+FFFD so the line is valid UTF-8. */
    static String json(String text) {
        StringBuilder out = new StringBuilder(text.length() + 2).append('"');
        for (int i = 0; i < text.length(); i++) {
            char c = text.charAt(i);
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20 || c == 0x7f) {
                out.append(String.format("\\u%04x", (int) c));
            } else if (Character.isHighSurrogate(c) && i + 1 < text.length() && Character.isLowSurrogate(text.charAt(i + 1))) {
                out.append(c).append(text.charAt(++i));
            } else if (Character.isSurrogate(c)) {
                out.append('\uFFFD');
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }
}
