#!/usr/bin/env bash
# Sets up everything hkdbench needs on a fresh machine: a virtual environment in .venv with the package
# installed (editable, with the test and docs extras), and the offline Fashion-MNIST data. Safe to run again: each step
# is skipped when already done. Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
stamp=.venv/.hkdbench-installed
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    echo "[setup] installing hkdbench and its dependencies into .venv (torch, torchvision, timm, ...)"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,docs]' 2>&1 \
        | grep -v -e "^WARNING: Location" -e "is ignored: it is neither" || true
    .venv/bin/python -c "import hkdbench.benchmark.cli.main, torch, timm, mkdocs, material" \
        || { echo "[setup] the install failed; see the pip output above" >&2; exit 1; }
    touch "$stamp"
fi

# The offline default dataset: Debian's dataset-fashion-mnist package, unless data is given elsewhere.
fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ] && [ -z "${HKDBENCH_SKIP_DATA:-}" ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "[setup] installing Debian's dataset-fashion-mnist (31 MB)"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        cat >&2 <<'MSG'
[setup] Fashion-MNIST is missing and cannot be installed here (needs root and apt-get).
        Either: sudo apt-get install dataset-fashion-mnist
        or: put the four IDX files of https://github.com/zalandoresearch/fashion-mnist under ROOT/FashionMNIST/raw
            and pass data.root=ROOT (or --data-root ROOT) to hkdbench; set HKDBENCH_SKIP_DATA=1 to skip this check.
MSG
        exit 1
    fi
fi
