#!/usr/bin/env bash
# The main job on the offline default: set-up, then `hkdbench demo` (teacher resnet_mini -> student vit_mini on
# Fashion-MNIST with none / kd / fitnet) and its comparison table. Extra arguments go to `hkdbench demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/hkdbench demo "$@"
