"""Writes the kernel specs (DEST/<name>/kernel.json) for javascript, typescript, java, r and bash.

Used by install.sh (DEST=/usr/local/share/jupyter/kernels, in the guest) and by selftest.py
--dev (a temporary DEST on a development host). Every spec uses ``interrupt_mode: signal``.
The python3 spec is not written here: ipykernel's pip package installs it.

Usage: python3 specs.py --dest DIR --python PY --node NODE --typescript DIR [--typescript-cache FILE]
                        [--global-modules DIR] --java JAVA --java-classpath JAR [--java-cds FILE]
       python3 specs.py --print-cds-dump-command FILE --java JAVA --java-classpath JAR
(the second form prints, space-separated, the JVM command that dumps the CDS archive FILE).
"""

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

# JVM start-up under emulation: C1 only, serial GC, no perf data file, class data sharing.
JAVA_FLAGS = ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-XX:-UsePerfData", "-Xss4m",
              "-Xlog:disable"]  # unified logging (CDS warnings) would write to the user's stdout


def java_command(java, classpath, cds="", dump_cds=""):
    """The JVM command line of the java kernel's child; with dump_cds, the training run's.

    The class path must be a jar: class data sharing refuses class directories.
    """
    flags = list(JAVA_FLAGS)
    if cds:
        flags += ["-Xshare:auto", "-XX:SharedArchiveFile=" + cds]
    if dump_cds:
        flags += ["-XX:ArchiveClassesAtExit=" + dump_cds]
    return [java, *flags, "-cp", classpath, "VivJShell"]


def kernel_specs(args):
    childkernel = os.path.join(HERE, "childkernel.py")
    node_child = [args.node, os.path.join(HERE, "js", "driver.js"), "--typescript", args.typescript]
    if args.typescript_cache:
        node_child += ["--typescript-cache", args.typescript_cache]
    if args.global_modules:
        node_child += ["--global-modules", args.global_modules]
    specs = {
        "javascript": ("JavaScript (Node.js)", "javascript",
                       [args.python, childkernel, "javascript", "-f", "{connection_file}", "--",
                        *node_child, "--lang", "js"]),
        "typescript": ("TypeScript (Node.js)", "typescript",
                       [args.python, childkernel, "typescript", "-f", "{connection_file}", "--",
                        *node_child, "--lang", "ts"]),
        "java": ("Java (JShell)", "java",
                 [args.python, childkernel, "java", "-f", "{connection_file}", "--",
                  *java_command(args.java, args.java_classpath, args.java_cds)]),
        "r": ("R", "R", [args.r, "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"]),
        "bash": ("Bash", "bash",
                 [args.python, os.path.join(HERE, "bashkernel.py"), "-f", "{connection_file}"]),
    }
    return {
        name: {"argv": argv, "display_name": display, "language": language,
               "interrupt_mode": "signal", "env": {"PS1": "$"} if name == "bash" else {}}
        for name, (display, language, argv) in specs.items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print-cds-dump-command", default="")
    parser.add_argument("--dest")
    parser.add_argument("--python")
    parser.add_argument("--node", default="node")
    parser.add_argument("--typescript")
    parser.add_argument("--typescript-cache", default="")
    parser.add_argument("--global-modules", default="")
    parser.add_argument("--java", default="java")
    parser.add_argument("--java-classpath", required=True)
    parser.add_argument("--java-cds", default="")
    parser.add_argument("--r", default="R")
    args = parser.parse_args()
    if args.print_cds_dump_command:
        print(" ".join(java_command(args.java, args.java_classpath, dump_cds=args.print_cds_dump_command)))
        return
    if not (args.dest and args.python and args.typescript):
        parser.error("--dest, --python and --typescript are required")
    for name, spec in kernel_specs(args).items():
        directory = os.path.join(args.dest, name)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "kernel.json"), "w") as f:
            json.dump(spec, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
