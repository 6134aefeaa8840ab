#!/usr/bin/env bash
# Fetch, here, the wheels that benchmarks/device_run.sh installs on the device machine (its image has torch 2.11,
# transformers 5.17 and numpy but no bitsandbytes and no pydantic; nothing can be downloaded there). They go to
# .whl/ in the repository root, which git must ignore (.git/info/exclude) and the device call carries.
# About 46 MB: within the 64 MiB a call carries, beside the repository (about 1.5 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  bitsandbytes==0.50.2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
du -ch .whl/*.whl | tail -1
