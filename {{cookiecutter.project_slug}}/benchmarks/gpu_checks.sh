#!/usr/bin/env bash
# The GPU checks in one go, most important first, each with its own time limit so that one slow
# part cannot starve the rest. Run from the project root on a machine with a CUDA GPU:
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
# Every result lands in OUT_DIR (default gpu_results/): one log per part and the benchmarks' JSON.
set -u
out=${1:-gpu_results}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "   exit $? ($(tail -n 1 "$out/$name.log" | cut -c1-150))"
}

short=(--trainer.max_steps=4 --trainer.limit_val_batches=1 --trainer.enable_progress_bar=false)
# (i) the DDP and FSDP configs on one GPU, a few steps each
part ddp 180 python train.py fit --config configs/default.yaml --config configs/trainer/ddp.yaml \
  --trainer.accelerator=gpu --trainer.devices=1 "${short[@]}" --trainer.logger.init_args.name=gpu_ddp
part fsdp 180 python train.py fit --config configs/default.yaml --config configs/trainer/fsdp.yaml \
  --trainer.devices=1 "${short[@]}" --trainer.logger.init_args.name=gpu_fsdp
# (i b) issue 13 under FSDP: LoRA with the adapter-off reference, 2 PPO epochs, gradient clipping
part fsdp_lora 180 python train.py fit --config configs/default.yaml --config configs/recipe/lora.yaml --config configs/trainer/fsdp.yaml \
  --trainer.devices=1 "${short[@]}" --model.init_args.updates.ppo_epochs=2 --model.init_args.updates.gradient_clip_val=1.0 \
  --trainer.logger.init_args.name=gpu_fsdp_lora
# (ii) RB vs MC step time and peak memory, float32 and bf16, shapes a and b, both APIs
part step_fp32 240 python benchmarks/step.py --shapes a,b --pairs 9 --dtype float32
part step_bf16 240 python benchmarks/step.py --shapes a,b --pairs 9 --dtype bfloat16
# (ii b) issue 20: the fused LM head vs materialised logits vs a peer k3 step, GPT-2 small and
# Qwen2-0.5B's shape in bf16 weights
part step_fused 300 python benchmarks/step.py --api fused --shapes b,q05 --pairs 5 --dtype bfloat16
# (iii) sampling: fast vs generate on the GPU
part sampling 120 python benchmarks/sampling.py --pairs 5
# (iii b) issue 15 item 4: static cache and compiled decode steps (CUDA graphs) against the loop
part sampling_static 300 python benchmarks/sampling.py --pairs 5 --static
# (iv) the offline default end to end on the GPU
part default 180 python train.py fit --config configs/default.yaml --trainer.accelerator=gpu \
  --trainer.enable_progress_bar=false --trainer.logger.init_args.name=gpu_default
# (v) issue 30: rollouts on vLLM against the own decode loop, three shapes. The image must hold
# vllm (pip install "vllm>=0.32,<0.33", or its wheels carried to an offline machine).
if python -c "import vllm" 2>/dev/null; then
  part engines 300 python benchmarks/engines.py --shapes tiny,b,q05 --rounds 3
else
  echo "== engines: skipped, vllm is not installed (pip install \"vllm>=0.32,<0.33\")"
fi
cp -r logs "$out/logs" 2>/dev/null || true
