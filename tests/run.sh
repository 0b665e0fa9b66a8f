#!/usr/bin/env bash
# Installs everything the test suite needs (Python packages; Debian's chromium when it is
# missing and we are root), then runs ruff, mypy and the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "run.sh: installing Debian's chromium for the browser tests"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
            echo "run.sh: could not install chromium; the browser tests will say they are skipped"
        fi
    else
        echo "run.sh: chromium is missing and cannot be installed here (not root or no apt-get)"
    fi
fi

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m mypy

set +e
python3 -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "run.sh: pytest collected no tests"
    exit 1
fi
exit "$status"
