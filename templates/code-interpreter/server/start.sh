#!/bin/sh
# Placeholder: answers /health only.
mkdir -p /tmp/placeholder && echo ok > /tmp/placeholder/health && cd /tmp/placeholder && exec python3 -m http.server 49999
