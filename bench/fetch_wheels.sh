#!/usr/bin/env bash
# Downloads flash-linear-attention (FLA) and the pytest plugins of the GPU check (pytest-xdist with execnet,
# pytest-timeout) as wheels into bench/wheels/ (gitignored), on a machine where pip reaches the package index,
# for bench/gpu_check.sh on a GPU machine without network (carry bench/wheels; its wheels step installs
# those the machine lacks, with --no-index --no-deps; without them the FLA rows are skipped and the tests run
# one at a time without a per-test timeout):
#
#   bash bench/fetch_wheels.sh                 # FLA 0.6.0 (default), pure Python
#   FLA_VERSION=0.5.2 bash bench/fetch_wheels.sh
#
# Since 0.3 FLA is two distributions: fla-core (the Triton kernels, fla.ops, among them
# fla.ops.gated_delta_rule.chunk_gated_delta_rule; needs torch >= 2.7, triton >= 3.3 and einops) and
# flash-linear-attention (fla.layers and fla.models on top, needs transformers). Both are fetched, with
# --no-deps: the GPU machine already has torch, triton, einops and transformers (its image: torch 2.11,
# triton 3.6, einops, transformers 5), and gpu_check.sh installs them with --no-index --no-deps.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

version=${FLA_VERSION:-0.6.0}
py=${PYTHON:-python3}
mkdir -p wheels
rm -f wheels/fla_core-*.whl wheels/flash_linear_attention-*.whl   # one version of each: two stop the install
rm -f wheels/pytest_xdist-*.whl wheels/execnet-*.whl wheels/pytest_timeout-*.whl
# Pure-Python wheels, so no --platform / --python-version is needed for the GPU machine's Python 3.12.
"$py" -m pip download --no-deps --only-binary=:all: -d wheels "fla-core==$version" "flash-linear-attention==$version" \
  pytest-xdist==3.8.0 execnet==2.1.2 pytest-timeout==2.4.0
for whl in wheels/*.whl; do
  echo "$whl: $(unzip -p "$whl" '*.dist-info/METADATA' | grep -E '^Requires-Dist' | grep -v 'extra ==' |
    sed 's/Requires-Dist: //' | paste -sd, -)"
done
listing=$(unzip -Z1 wheels/fla_core-"$version"-*.whl)
grep -qx 'fla/ops/gated_delta_rule/chunk.py' <<<"$listing" ||
  { echo "fla-core $version has no fla/ops/gated_delta_rule/chunk.py" >&2; exit 1; }
echo "bench/wheels:" wheels/*.whl "(carry bench/wheels to the GPU machine)"
