#!/usr/bin/env bash
# One GPU session: diffusion_jax's benchmarks and the PyTorch diffusers peer, side by side on
# the same card, each stage under its own time limit so that one failure loses nothing else.
#   OUT=/tmp/out bash benchmarks/gpu_session.sh        # results in $OUT/results.jsonl
#   ONLY="unet_b512 digits_bf16" bash benchmarks/gpu_session.sh   # just these stages (a second call
#                                                      # for what the first one's limit cut)
# Needs jax with CUDA, flax, optax, ml_collections; torch and diffusers for the peer stages.
# Every JSON line in results.jsonl starts with the stage that wrote it.
#
# Limits: an H200 with jax 0.11.2 (2026-11-29) compiled the U-Net train step in 80 s at batch 512
# (51.5 s on an H100 with jax 0.11.2 before) and needed more than 80 s for separate q/k/v; the
# U-Net stages allow 150 s. What issue #17 still needs after the 2026-11-29 H200 session
# (benchmarks/results/h200_2026-11-29.jsonl has the rest), in order of value (a session has about
# 800 s of stages after the machine starts):
#   ONLY="kernels dit_b256 dit_trace dit_pallas_ops unet_b128 unet_trace peer_unet unet_compile_warm"  # ~440 s
#   ONLY="unet_pallas_ops sample sample_pallas_ops dit_cublaslt"                 # ~250 s
#   then, with what is left: dit_separate_qkv, peer_dit (if a DiT variant wins), unet_autotune0.
# Issue #27's Stable Diffusion 1.5 at 512x512 (a random-weight pipeline written on the machine,
# DDIM-50, guidance 7.5, batch 1 and 4; ours float32, the peer float16 and float32, no transformers):
#   ONLY="sd15_pipeline peer_sd15_pipeline"                                      # ~400 s
# Issue #37's LoRA cost and SDXL (1024x1024, Euler-30, guidance 5, batch 4):
#   ONLY="sd15_lora sdxl_pipeline peer_sdxl_pipeline"                            # ~600 s
# (unet_b128 compiles cold into $CACHE, unet_compile_warm is the same program from it; dit_b256 and
# unet_b128 write their optimised HLO next to the profile, so each kernel in the *_trace lines
# names the JAX operations it computes.)
# The device image has jax, flax, optax, orbax, torch; diffusers, ml_collections and tensorboardX
# travel as wheels in .whl (pip download --no-deps ... diffusers==0.42.1 ml_collections tensorboardX
# importlib_metadata==8.7.0), installed first:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -u
OUT=${OUT:-/tmp/diffusion_jax_bench}
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
PY=${PY:-python3}
PEER_PY=${PEER_PY:-$PY}
# Sizes: the published ones; SMOKE=1 shrinks everything for a dry run on a CPU.
if [ "${SMOKE:-0}" = 1 ]; then
  UNET=unet_tiny; DIT=dit_tiny; BU=8; BU2=16; BD=8; BS=4; STEPS=20; CLASSES=10
  PEER="--unet_batch 2 --dit_batch 2 --sample_batch 2 --sample_steps 5"
  SD=tiny; SD_OURS="--batch 2 --steps 3 --repeats 1"; SD_PEER="--sd_batch 2 --sd_steps 3 --sd_repeats 1"
  SDXL=sdxl_tiny; SDXL_OURS="--batch 2 --steps 3 --repeats 1"; SDXL_PEER="--sd_batch 2 --sd_steps 3 --sd_repeats 1"
  LORA="--batch 2 --steps 3 --repeats 1 --lora 4:0.8"
else
  UNET=ddpm_cifar10; DIT=dit_b2; BU=128; BU2=512; BD=256; BS=256; STEPS=1000; CLASSES=1000; PEER=""
  SD=sd15; SD_OURS="--batch 1 --batch 4 --steps 50"; SD_PEER="--sd_batch 1 --sd_batch 4 --sd_steps 50"
  SDXL=sdxl; SDXL_OURS="--batch 4 --steps 30"; SDXL_PEER="--sd_batch 4 --sd_steps 30"
  LORA="--batch 4 --steps 50 --lora 16:0.8"
fi
RESULTS=$OUT/results.jsonl
LOG=$OUT/log.txt
START=$(date +%s)

stage() {  # stage SECONDS NAME command...
  local secs=$1 name=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "=== $name (limit ${secs}s, at +$(( $(date +%s) - START ))s)" | tee -a "$LOG"
  timeout "$secs" "$@" 2>>"$LOG" | tee -a "$LOG" | grep --line-buffered '^{' \
    | sed -u "s/^{/{\"stage\": \"$name\", /" >>"$RESULTS"
  echo "=== $name: exit ${PIPESTATUS[0]} (+$(( $(date +%s) - START ))s)" | tee -a "$LOG"
}

keep_trace() {  # keep_trace NAME: the profile under /tmp/prof_NAME, copied at once (a later stage may be cut)
  local f
  f=$(find "/tmp/prof_$1" -name perfetto_trace.json.gz 2>/dev/null | tail -1)
  [ -n "$f" ] && cp "$f" "$OUT/$1_trace.json.gz"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee -a "$LOG"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$LOG"

# Most informative first (a run cut by its limit loses the end): the DiT target with a kernel
# profile, the same with autodiff instead of ops.py's gradients, its q/k/v variant and its
# peer; then what was never measured; then the rest.
# The ops with Pallas kernels alone, XLA against the kernels at three tile sizes (cheap: small programs).
if [ "${SMOKE:-0}" = 1 ]; then KERNELS="--smoke"; else KERNELS="--tile_elements 2048,4096,8192 --group_channels 32,64"; fi
stage 120 kernels $PY -m benchmarks.kernels $KERNELS
stage 100 dit_b256 $PY -m benchmarks.train --model $DIT --batch $BD --dtype bfloat16 --num_classes $CLASSES --steps 40 --profile /tmp/prof_dit --hlo $OUT/dit_hlo.txt.gz
stage 30 dit_trace $PY -m benchmarks.trace_summary /tmp/prof_dit --steps 3 --top 40 --hlo $OUT/dit_hlo.txt.gz
keep_trace dit
# The Pallas kernels (models/pallas_ops.py: adaLN LayerNorm, bias + GELU) against dit_b256's XLA fusions.
stage 80 dit_pallas_ops $PY -m benchmarks.train --model $DIT --batch $BD --dtype bfloat16 --num_classes $CLASSES --steps 30 --override ops_impl=pallas
stage 80 dit_autodiff_ops $PY -m benchmarks.train --model $DIT --batch $BD --dtype bfloat16 --num_classes $CLASSES --steps 30 --override autodiff_ops=True
stage 120 dit_separate_qkv $PY -m benchmarks.train --model $DIT --batch $BD --dtype bfloat16 --num_classes $CLASSES --steps 30 --override fused_qkv=False
stage 120 peer_dit $PEER_PY -m benchmarks.peer_diffusers --what dit_train --compile --compiled_only --steps 20 $PEER
stage 150 unet_b512 $PY -m benchmarks.train --model $UNET --batch $BU2 --dtype bfloat16 --steps 30
stage 120 digits_bf16 $PY -m experiments.digits_unet --workdir /tmp/digits_gpu --config.model.dtype=bfloat16
cp /tmp/digits_gpu/eval/metrics.json "$OUT/digits_bf16_metrics.json" 2>/dev/null
cp /tmp/digits_gpu/eval/samples.png "$OUT/digits_bf16_samples.png" 2>/dev/null
# The persistent compilation cache: unet_b128 compiles cold into a new $CACHE; unet_compile_warm
# (below) compiles the same program in a fresh process from it.
CACHE=/tmp/diffusion_jax_compilation_cache_$$
stage 150 unet_b128 env JAX_COMPILATION_CACHE_DIR=$CACHE $PY -m benchmarks.train --model $UNET --batch $BU --dtype bfloat16 --steps 60 --profile /tmp/prof_unet --hlo $OUT/unet_hlo.txt.gz
stage 30 unet_trace $PY -m benchmarks.trace_summary /tmp/prof_unet --steps 3 --top 40 --hlo $OUT/unet_hlo.txt.gz
# The Pallas GroupNorm (+ SiLU) kernels (models/pallas_ops.py) against unet_b128's XLA fusions.
stage 150 unet_pallas_ops $PY -m benchmarks.train --model $UNET --batch $BU --dtype bfloat16 --steps 60 --override ops_impl=pallas
keep_trace unet
stage 150 unet_autodiff_ops $PY -m benchmarks.train --model $UNET --batch $BU --dtype bfloat16 --steps 60 --override autodiff_ops=True
stage 150 peer_unet $PEER_PY -m benchmarks.peer_diffusers --what unet_train --compile --compiled_only --steps 20 $PEER
stage 120 sample $PY -m benchmarks.sample --model $UNET --batch $BS --dtype bfloat16 --methods ddpm:$STEPS,ddim:50 --repeats 1
stage 120 sample_pallas_ops $PY -m benchmarks.sample --model $UNET --batch $BS --dtype bfloat16 --methods ddpm:$STEPS --repeats 1 --override ops_impl=pallas
stage 75 peer_sample $PEER_PY -m benchmarks.peer_diffusers --what ddpm_sample $PEER
# XLA options worth a try on Hopper, each against dit_b256 (keep what wins, record what loses).
stage 80 dit_cublaslt env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_cublaslt=true" $PY -m benchmarks.train --model $DIT --batch $BD --dtype bfloat16 --num_classes $CLASSES --steps 30
stage 80 dit_no_triton_gemm env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" $PY -m benchmarks.train --model $DIT --batch $BD --dtype bfloat16 --num_classes $CLASSES --steps 30
# Where the U-Net's cold compile goes: without autotuning (compile_s and the speed it costs).
stage 150 unet_autotune0 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" $PY -m benchmarks.train --model $UNET --batch $BU --dtype bfloat16 --steps 30
# The persistent compilation cache: the same command again in a fresh process, with the cache
# unet_b128 (the cold compile) wrote; compile_s is what a user's second run waits. The same for
# sampling.
stage 90 unet_compile_warm env JAX_COMPILATION_CACHE_DIR=$CACHE $PY -m benchmarks.train --model $UNET --batch $BU --dtype bfloat16 --steps 5
stage 60 sample_compile_cold env JAX_COMPILATION_CACHE_DIR=$CACHE $PY -m benchmarks.sample --model $UNET --batch $BS --dtype bfloat16 --methods ddpm:50 --repeats 1
stage 60 sample_compile_warm env JAX_COMPILATION_CACHE_DIR=$CACHE $PY -m benchmarks.sample --model $UNET --batch $BS --dtype bfloat16 --methods ddpm:50 --repeats 1
stage 80 dit_xla_attention $PY -m benchmarks.train --model $DIT --batch $BD --dtype bfloat16 --num_classes $CLASSES --steps 30 --override attention_impl=xla

# Stable Diffusion 1.5, ours then PyTorch's on the same weights (written by the first stage).
stage 300 sd15_pipeline $PY -m benchmarks.pipeline --write /tmp/sd_$SD --size $SD $SD_OURS
stage 240 peer_sd15_pipeline $PEER_PY -m benchmarks.peer_diffusers --what sd_pipeline --pipeline /tmp/sd_$SD $SD_PEER
# Issue #37: what a LoRA costs a step (SD 1.5, a rank-16 LoRA on every attention projection at weight
# 0.8, against the same pipeline without; the pipeline the sd15 stage wrote), and SDXL's base at
# 1024x1024, Euler-30, guidance 5, batch 4, ours against PyTorch's on the same random weights.
stage 300 sd15_lora $PY -m benchmarks.pipeline --write /tmp/sd_$SD --size $SD $LORA
stage 420 sdxl_pipeline $PY -m benchmarks.pipeline --write /tmp/sdxl_$SDXL --size $SDXL --guidance_scale 5 $SDXL_OURS
stage 300 peer_sdxl_pipeline $PEER_PY -m benchmarks.peer_diffusers --what sd_pipeline --pipeline /tmp/sdxl_$SDXL --sd_guidance_scale 5 $SDXL_PEER

echo "=== summary (+$(( $(date +%s) - START ))s)"
$PY - "$RESULTS" <<'EOF'
import json, sys
keep = ("stage", "bench", "peer", "model", "batch", "method", "steps", "lora", "guidance_scale", "compiled", "overrides", "images_per_sec",
        "step_ms", "mfu", "dtype", "seconds", "samples_per_sec", "compile_s", "first_call_s", "warmup_s", "overhead", "peak_memory_gb", "compiled_temp_gb", "kernel_ms_per_step", "wall_ms_per_step", "kernels_per_step",
        "by_category_ms", "op", "shape", "impl", "tile_elements", "group_channels", "forward_ms", "forward_gb_s",
        "forward_backward_ms", "forward_backward_gb_s")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print({k: r[k] for k in keep if k in r})
EOF
