#!/usr/bin/env bash
# Creates (once) the virtual environment in which benchmarks/peers/kvpress_runner.py runs NVIDIA
# kvpress: kvpress 0.5.5 pins transformers < 5.3 while lckv needs >= 5.5.3, so the peer lives
# outside lckv's environment. torch is pinned (an unpinned torch pulls a multi-GB CUDA build).
#
#   bash benchmarks/peers/kvpress_env.sh            # -> ~/.cache/lckv/kvpress-venv
#   KVPRESS_VENV=/some/dir bash benchmarks/peers/kvpress_env.sh
#   bash benchmarks/peers/kvpress_env.sh /some/dir
#
# Idempotent: an environment that already imports the pinned kvpress is left as it is. Prints the
# environment's python on the last line of stdout, for scripts: PY=$(bash kvpress_env.sh | tail -1).
set -euo pipefail

VENV="${1:-${KVPRESS_VENV:-$HOME/.cache/lckv/kvpress-venv}}"
PYTHON="${PYTHON:-python3}"
PACKAGES=(torch==2.13.0 kvpress==0.5.5 gguf==0.19.0)

installed() {
    "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
want = {"torch": "2.13.0", "kvpress": "0.5.5", "gguf": "0.19.0"}
have = {name: md.version(name).split("+")[0] for name in want}
sys.exit(0 if have == want else 1)
EOF
}

if [ -x "$VENV/bin/python" ] && installed; then
    echo "kvpress environment ready: $VENV" >&2
else
    echo "creating kvpress environment in $VENV" >&2
    echo "+ $PYTHON -m venv $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    echo "+ $VENV/bin/pip install ${PACKAGES[*]}" >&2
    "$VENV/bin/pip" install --quiet "${PACKAGES[@]}" >&2
    installed || { echo "kvpress environment in $VENV is incomplete" >&2; exit 1; }
fi
"$VENV/bin/python" -c "import importlib.metadata as md; print(*(f'{p}=={md.version(p)}' for p in ('kvpress', 'transformers', 'torch', 'gguf')), file=__import__('sys').stderr)"
echo "$VENV/bin/python"
