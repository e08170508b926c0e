#!/bin/sh
# Installs the server (placeholder).
set -eu
