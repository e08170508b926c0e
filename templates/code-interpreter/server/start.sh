#!/bin/sh
# Placeholder: serves /health only.
exec python3 -m http.server 49999
