# Sourced by quickstart.sh and run_tests.sh: make ./.venv (Python 3.11) and install the
# given requirements file into it, only when that file changed since the last install.
#   usage: source env.sh requirements.txt
set -euo pipefail
REQ=${1:-requirements.txt}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV="$HERE/.venv"
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x "$VENV/bin/python" ]; then
    echo "[env] creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.installed-$(basename "$REQ")"
WANT=$(cat "$HERE/$REQ" "$HERE"/requirements*.txt | sha256sum | cut -c1-16)  # the files it includes too
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[env] installing $REQ into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$HERE/$REQ"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
