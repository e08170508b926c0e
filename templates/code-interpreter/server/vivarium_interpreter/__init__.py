"""The in-guest HTTP server that E2B's Code Interpreter SDKs talk to on port 49999.

It drives Jupyter kernels (one per context) with jupyter_client and streams their output back as
NDJSON. Modules: `languages` (names, kernel specs, helper code), `kernel` (one kernel process and
its channels), `contexts` (contexts, serialized executions, env vars), `results` (Jupyter messages
to SDK events), `sandbox_env` (the sandbox's env vars file), `app` (the HTTP routes).
"""
