#!/usr/bin/env bash
# Real-client tests: voicetagd against the official Python SDKs (paygent-sdk, vapi-server-sdk) and
# against livekit-agents through the voicetagd hook (clients/python, whose own unit tests run too),
# all pinned in requirements.txt. Works from a fresh clone: creates the venv, builds the daemon, runs pytest.
#   VENV=path   venv location (default .venv-clients at the repository root)
#   extra arguments are passed to pytest (e.g. -k usage -x)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
VENV="${VENV:-.venv-clients}"

if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/clients/requirements.txt
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e clients/python

cargo build

set +e
"$VENV/bin/python" -m pytest -q tests/clients clients/python/tests "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "tests/clients: no tests were collected (pytest exit 5) - treating as failure" >&2
    exit 1
fi
exit $rc
