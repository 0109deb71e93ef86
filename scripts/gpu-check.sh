#!/usr/bin/env bash
# The GPU check (benchmark/tools/gpu_check.py) on one GPU machine without network, in about 7 minutes:
#
#   bash scripts/gpu-check.sh --prepare        # here (pip reaches an index or its cache): builds .gpu-bundle/
#   bash scripts/gpu-check.sh [--tiny] OUTDIR  # there: installs the project, measures, writes OUTDIR
#   bash scripts/gpu-check.sh --requirements   # there: what the machine lacks, what the bundle would install
#
# The machine's python needs torch, torchvision, numpy and pyyaml, nothing else. The bundle (.gpu-bundle/,
# git-ignored, ~34 MB: copy it along with the checkout) holds the pure-Python wheels of the rest at the versions
# this checkout is tested with (timm, submitit, cloudpickle, tqdm; timm runs without its huggingface_hub and
# safetensors, which only fetch and read pretrained weights), setuptools for the editable install, and the
# Fashion-MNIST files. The check installs the project with `pip install --no-deps -e .` into a venv that sees the
# machine's packages (.gpu-venv/, git-ignored), adds the bundle's wheels whose distribution is missing there or of
# another version, then runs the parts within what is left of the budget.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 400: install + parts; the device tool allows
# 600 s a command), GPU_CHECK_TINY=1 (the same as --tiny: toy sizes, for a CPU), GPU_CHECK_SKIP_INSTALL=1 (use
# PYTHON as it is: the project is installed), GPU_BUNDLE (default .gpu-bundle/).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="${GPU_BUNDLE:-$ROOT/.gpu-bundle}"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-400}"
FASHION_MNIST_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
# what the machine must have (compiled packages); the bundle brings the rest as pure-Python wheels (pandas,
# matplotlib and seaborn are for the analysis and the figures, which the check never imports)
REQUIRED_PRESENT="torch torchvision numpy yaml"
BUNDLED="timm submitit cloudpickle tqdm"

usage() {
    echo "usage: bash scripts/gpu-check.sh --prepare | --requirements | [--tiny] OUTDIR" >&2
    exit 2
}

prepare() {
    local py="$ROOT/.venv/bin/python"
    [ -x "$py" ] || py="$PYTHON"
    mkdir -p "$BUNDLE/wheels" "$BUNDLE/fashion-mnist" || exit 1
    # the versions this checkout is tested with, as installed in its venv; and a setuptools that builds wheels on
    # its own (>= 70.1: no 'wheel' package) for the editable install in pip's isolated build environment
    local pins
    # shellcheck disable=SC2086
    pins=$("$py" - $BUNDLED <<'EOF'
import importlib.metadata as m, sys
print(" ".join(f"{d}=={m.version(d)}" for d in sys.argv[1:]), "setuptools>=70.1")
EOF
) || { echo "gpu-check --prepare: $py lacks one of $BUNDLED" >&2; exit 1; }
    rm -f "$BUNDLE"/wheels/*.whl  # one version of each: the bundle is the tested set, nothing older
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

# the bundle's wheels that PY needs (missing there, or of another version), one path a line; fails, naming them,
# where PY lacks a module the bundle cannot supply. Nothing is imported (find_spec, metadata): a quick check.
bundle_wheels_needed() {
    # shellcheck disable=SC2086
    "$PY" - "$BUNDLE/wheels" $REQUIRED_PRESENT -- $BUNDLED <<'EOF'
import importlib.metadata, importlib.util, pathlib, re, sys
wheels, rest = sys.argv[1], " ".join(sys.argv[2:])
required, bundled = (part.split() for part in rest.split(" -- "))
absent = [m for m in required if importlib.util.find_spec(m) is None]
if absent:
    sys.exit(f"the check needs {', '.join(absent)} installed in {sys.executable} (the bundle brings only "
             f"{', '.join(bundled)})")
def norm(name):
    return re.sub(r"[-_.]+", "_", name).lower()
files = {norm(w.name.split("-")[0]): w for w in pathlib.Path(wheels).glob("*.whl")}
for dist in bundled:
    wheel = files.get(norm(dist))
    if wheel is None:
        sys.exit(f"the bundle {wheels} has no wheel of {dist}: run scripts/gpu-check.sh --prepare where pip works")
    try:
        present = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        present = None
    if present != wheel.name.split("-")[1]:
        print(wheel)
EOF
}

# install PY: PYTHON itself when it is a venv, else a venv over its packages (failing that, its user site); then
# the bundle's wheels it needs and the project (editable, no deps)
install() {
    local venv="$ROOT/.gpu-venv" wheels
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
    wheels=$(bundle_wheels_needed) || return 1
    if [ -n "$wheels" ]; then
        echo "installing from $BUNDLE/wheels:" $wheels
        # shellcheck disable=SC2086
        "$PY" -m pip install --no-index --no-deps $wheels || return 1
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
    --requirements)
        [ $# -eq 1 ] || usage
        PY="$PYTHON"
        wheels=$(bundle_wheels_needed) || exit 1
        names=$(for w in $wheels; do basename "$w"; done | tr '\n' ' ')
        echo "$PYTHON has torch, torchvision, numpy and pyyaml; to install from the bundle: ${names:-nothing}"
        exit 0 ;;
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
