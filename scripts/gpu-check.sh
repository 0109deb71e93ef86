#!/usr/bin/env bash
# The GPU check (benchmark/tools/gpu_check.py) on one GPU machine without network, in about 8 minutes:
#
#   bash scripts/gpu-check.sh --prepare        # here (pip reaches an index or its cache): builds .gpu-bundle/
#   bash scripts/gpu-check.sh [--tiny] OUTDIR  # there: installs the project, measures, writes OUTDIR
#
# The bundle (.gpu-bundle/, git-ignored, ~30 MB: copy it along with the checkout) holds the pure-Python wheels the
# project needs beyond torch, torchvision, timm, pandas, matplotlib and seaborn (submitit, cloudpickle, tqdm, and
# setuptools for the editable install) and the Fashion-MNIST files. The check installs the project with
# `pip install --no-deps -e .` into a venv that sees the machine's packages (.gpu-venv/, git-ignored), adds only
# the bundle's wheels whose modules are missing, then runs the parts within what is left of the 8 minutes.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 480: install + parts), GPU_CHECK_TINY=1 (the
# same as --tiny: toy sizes, for a CPU), GPU_CHECK_SKIP_INSTALL=1 (use PYTHON as it is: the project is installed).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="${GPU_BUNDLE:-$ROOT/.gpu-bundle}"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
FASHION_MNIST_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
# module:distribution pairs the bundle can supply (pyyaml is not among them: it has compiled wheels, and timm
# already needs it)
BUNDLED="submitit:submitit cloudpickle:cloudpickle tqdm:tqdm"
REQUIRED_PRESENT="torch torchvision timm numpy pandas matplotlib seaborn yaml"

usage() {
    echo "usage: bash scripts/gpu-check.sh --prepare | bash scripts/gpu-check.sh [--tiny] OUTDIR" >&2
    exit 2
}

prepare() {
    local py="$ROOT/.venv/bin/python"
    [ -x "$py" ] || py="$PYTHON"
    mkdir -p "$BUNDLE/wheels" "$BUNDLE/fashion-mnist" || exit 1
    # the versions this checkout is tested with, as installed in its venv; and a setuptools that builds wheels on
    # its own (>= 70.1: no 'wheel' package) for the editable install in pip's isolated build environment
    local pins
    pins=$("$py" - <<'EOF'
import importlib.metadata as m
print(" ".join(f"{d}=={m.version(d)}" for d in ("submitit", "cloudpickle", "tqdm")), "setuptools>=70.1")
EOF
) || { echo "gpu-check --prepare: $py lacks one of submitit, cloudpickle, tqdm" >&2; exit 1; }
    # shellcheck disable=SC2086
    "$py" -m pip download --no-deps --only-binary=:all: -d "$BUNDLE/wheels" $pins || {
        echo "gpu-check --prepare: pip could not fetch $pins (no index and no cache?)" >&2; exit 1; }
    local f
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        if [ -f "$FASHION_MNIST_DIR/$f.gz" ]; then cp "$FASHION_MNIST_DIR/$f.gz" "$BUNDLE/fashion-mnist/"
        elif [ -f "$FASHION_MNIST_DIR/$f" ]; then cp "$FASHION_MNIST_DIR/$f" "$BUNDLE/fashion-mnist/"
        else echo "gpu-check --prepare: $FASHION_MNIST_DIR has no $f(.gz); set FASHION_MNIST_DIR" >&2; exit 1
        fi
    done
    echo "gpu-check --prepare: $BUNDLE ($(du -sh "$BUNDLE" | cut -f1)):"
    ls "$BUNDLE/wheels" "$BUNDLE/fashion-mnist"
}

# install PY: PYTHON itself when it is a venv, else a venv over its packages (failing that, its user site); then
# the missing bundled wheels and the project (editable, no deps)
install() {
    local venv="$ROOT/.gpu-venv" missing
    if "$PYTHON" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
        PY="$PYTHON"  # a venv made from a venv would not see its packages
    elif "$PYTHON" -m venv --system-site-packages "$venv" && "$venv/bin/python" -c "import torch"; then
        PY="$venv/bin/python"
    else
        echo "no venv over $PYTHON's packages that sees torch (ensurepip missing?): using its user site" >&2
        PY="$PYTHON"
        export PIP_USER=1 PIP_BREAK_SYSTEM_PACKAGES=1
    fi
    echo "installing with $PY"
    # one interpreter, no imports (find_spec): absent required modules fail, absent bundled ones are installed
    missing=$("$PY" - $REQUIRED_PRESENT -- $BUNDLED <<'EOF'
import importlib.util, sys
required, bundled = " ".join(sys.argv[1:]).split(" -- ")
absent = [m for m in required.split() if importlib.util.find_spec(m) is None]
if absent:
    sys.exit(f"the check needs {', '.join(absent)} installed in {sys.executable}")
print(" ".join(p.split(":")[1] for p in bundled.split() if importlib.util.find_spec(p.split(":")[0]) is None))
EOF
) || return 1
    if [ -n "$missing" ]; then
        echo "installing from $BUNDLE/wheels: $missing"
        # shellcheck disable=SC2086
        "$PY" -m pip install --no-index --no-deps --find-links "$BUNDLE/wheels" $missing || return 1
    fi
    # the machine's setuptools builds the editable install; without one (or too old), the bundle's
    "$PY" -m pip install --no-index --no-deps --no-build-isolation -e "$ROOT" \
        || "$PY" -m pip install --no-index --no-deps --find-links "$BUNDLE/wheels" -e "$ROOT"
}

# a summary saying why nothing was measured (the python side writes it otherwise)
write_failure() {
    local out="$1" why="$2"
    printf '{"install": "failed", "error": "%s", "parts": []}\n' "$why" > "$out/summary.json"
    printf '# GPU check\n\nnothing measured: %s (see install.log)\n' "$why" > "$out/summary.md"
}

TINY="${GPU_CHECK_TINY:-}"
[ $# -ge 1 ] || usage
case "$1" in
    --prepare) [ $# -eq 1 ] || usage; prepare; exit $? ;;
    --tiny) TINY=1; shift ;;
esac
[ $# -eq 1 ] || usage
OUT="$1"
mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"
START=$(date +%s)
if [ -n "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
    PY="$PYTHON"
    INSTALL="skipped (GPU_CHECK_SKIP_INSTALL)"
elif install > "$OUT/install.log" 2>&1; then
    INSTALL="ok"
else
    tail -5 "$OUT/install.log" >&2
    write_failure "$OUT" "the install failed"
    exit 1
fi
SPENT=$(( $(date +%s) - START ))
ARGS=(--budget-s "$(( BUDGET_S - SPENT - 10 ))" --install "$INSTALL ($SPENT s)")
[ -d "$BUNDLE/fashion-mnist" ] && ARGS+=(--data-root "$BUNDLE/fashion-mnist")
[ -n "$TINY" ] && ARGS+=(--tiny)
exec "$PY" -m hkdbench.benchmark.tools.gpu_check "$OUT" "${ARGS[@]}"
