#!/usr/bin/env bash
# The GPU path check: `bench/gpu_check.sh [--device cuda|cpu|auto] [--images N] [--size PX]`.
#
# Runs bench/gpu_check.py (extraction and the explainer's methods in-process, the
# device's results against the CPU's, timed) with the machine's own Python and torch,
# whatever their versions: $PYTHON, else python3; the repository's .venv is not
# needed. When a module the check imports is missing, a venv that sees the machine's
# packages (--system-site-packages, so its CUDA torch stays the one used) is made
# under var/gpu-check-venv and pip installs only what is missing. Nothing else is
# downloaded: the models are the shipped toynet and a resnet18 with random weights.
# Stopped after GPU_CHECK_TIMEOUT_S seconds (default 540, under the 10 minutes asked).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=var/gpu-check-venv
# module to import = package to install
wanted="torch=torch torchvision=torchvision numpy=numpy scipy=scipy PIL=pillow grpc=grpcio
grpc_health=grpcio-health-checking grpc_reflection=grpcio-reflection google.protobuf=protobuf
ray=ray yaml=pyyaml open_clip=open-clip-torch timm=timm prometheus_client=prometheus-client
minio=minio rich=rich"

missing_packages() {
    local pairs=() pair
    for pair in $wanted; do pairs+=("$pair"); done
    "$1" - "${pairs[@]}" <<'EOF'
import importlib.util, sys
missing = []
for pair in sys.argv[1:]:
    module, package = pair.split("=")
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        missing.append(package)
print(" ".join(missing))
EOF
}

if [ -x "$venv/bin/python" ]; then python=$venv/bin/python; fi
missing=$(missing_packages "$python")
if [ -n "$missing" ]; then
    echo "gpu_check: $python lacks: $missing; installing them into $venv"
    [ -x "$venv/bin/python" ] || "$python" -m venv --system-site-packages "$venv"
    python=$venv/bin/python
    # shellcheck disable=SC2086
    "$python" -m pip install --quiet $missing
fi

export PYTHONPATH="$PWD:$PWD/protos${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_CHECK_TIMEOUT_S:-540}" "$python" -m bench.gpu_check "$@"
