#!/usr/bin/env bash
# One device call for issue 25: benchmarks/bench_gpu_generation.py on the H200 inside the tool's 10-minute limit.
#
# Here, once:   bash benchmarks/device_wheels.sh          (wheels into .whl/, ignored by git)
# Device tool:  run(command="bash benchmarks/device_run.sh", carry=[".whl"], timeout_s=600)
# Afterwards:   copy gpu_generation_h200.json from the reply's files_at into benchmarks/results/ and commit it;
#               bench.log and nvidia_smi.txt beside it are the raw record.
#
# The model is built on the device (a seeded random Mistral-7B shape in bf16, quantized to nf4 there): nothing
# large travels. Knobs (environment): DEADLINE (s, default 470: no step starts that is expected to end later;
# the JSON is rewritten after every step, so a run killed at the limit keeps what it measured), ENGINES
# (default nf4,dequantized,static,static_eager; static_eager, the static cache without compilation, runs last
# and only separates the two effects), BATCHES
# (default 64,128,256), EXTRA (more arguments, e.g. "--nf4-batches 64,256").
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheels missing: run benchmarks/device_wheels.sh here and carry .whl"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1
python3 - <<'PY' 2>&1 | tee -a "$OUT/bench.log"
import torch, transformers, bitsandbytes
print({"torch": torch.__version__, "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
       "gpu": torch.cuda.get_device_name(), "free_gb": round(torch.cuda.mem_get_info()[0] / 1e9, 1)})
PY
timeout $(( ${DEADLINE:-470} + 110 )) python3 benchmarks/bench_gpu_generation.py --deadline-s "${DEADLINE:-470}" \
  --engines "${ENGINES:-nf4,dequantized,static,static_eager}" --batches "${BATCHES:-64,128,256}" --profile \
  --name gpu_generation_h200 --out "$OUT/gpu_generation_h200.json" ${EXTRA:-} 2>&1 | tee -a "$OUT/bench.log"
echo "exit ${PIPESTATUS[0]}"
