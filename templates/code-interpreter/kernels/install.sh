#!/bin/sh
# Installs the kernel specs (placeholder: ipykernel's python3 spec comes with its pip package).
set -eu
