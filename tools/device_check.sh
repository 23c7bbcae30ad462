#!/bin/sh
# The GPU check in one command (see tools/device_check.py): tools/device_check.sh [OUTDIR]
exec python3 "$(dirname "$0")/device_check.py" "$@"
