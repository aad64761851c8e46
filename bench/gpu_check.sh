#!/usr/bin/env bash
# The one command a lent GPU runs: build with all cores, run the whole test suite (CUDA tests
# included), every benchmark in bench/, logs and JSON under $OUT (or the folder given), a short
# table printed last. From the repository root:   bash bench/gpu_check.sh [OUT_DIR]
# Carried wheels in .whl/ (bitsandbytes, torchao: ../shared/gpu/fetch-wheels.sh) are installed first.
# Parts, so that each call fits the 15-minute device budget with room for a rerun (stage times are
# printed): GPU_CHECK_PART=kernels (default: build, CUDA tests, kernel benchmarks), headline (build,
# then the time-boxed 65B/8B memory runs, 7B end-to-end, estimate check), all (both: over 15 minutes
# and more than the 8 files a device call returns).
# GPU_CHECK_QUICK=1: build, CUDA tests and the short benchmarks only (moe, optimizer, estimate).
set -uo pipefail
OUT_DIR=${1:-${OUT:-bench/out}}
PART=${GPU_CHECK_PART:-kernels}
case "$PART" in kernels|headline|all) ;; *) echo "GPU_CHECK_PART must be kernels, headline or all" >&2; exit 2;; esac
stage() { echo "== $1 (t=${SECONDS}s)"; }
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

stage build
# With the GPU image's default compiler (/opt/gcc, not the one its torch was built with) a C++ exception
# thrown by our kernels killed the process (segfault); the system g++ builds a working extension.
if [ -x /usr/bin/g++ ] && [ -z "${KEEP_CC:-}" ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi  # the image sets CXX
t0=$(date +%s)
MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  python3 setup.py build_ext --inplace >"$OUT_DIR/build.log" 2>&1 || { tail -40 "$OUT_DIR/build.log"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s with ${CXX:-the default compiler}"

stage "C++ errors surface as Python exceptions"
python3 -c "
import torch, qlora_ext
for call in (lambda: torch.ops.qlora.quantize_4bit(torch.randn(64, 2).t(), 64, 'nf4'),
             lambda: torch.ops.qlora.dequantize_4bit(torch.zeros(32, dtype=torch.uint8), torch.ones(0), 64, 'nf4', [64], torch.float32)):
    try:
        call()
    except ValueError as e:
        print('ValueError:', str(e).splitlines()[0])
" 2>&1 | tail -2; echo "rc=${PIPESTATUS[0]}"

if [ "$PART" != headline ]; then
stage "tests: CUDA first, then the rest"
# GPU_CHECK_TESTS_K="expr": only the CUDA tests matching -k expr here; the others run after the benchmarks
# (under GPU_CHECK_REST_S, default 150 s), so the code changed since the last GPU run is checked and timed first.
TESTS_K=${GPU_CHECK_TESTS_K:-}
timeout "${GPU_CHECK_TESTS_S:-300}" python3 -m pytest python_tests -m cuda ${TESTS_K:+-k "$TESTS_K"} -q --tb=short \
  -rfE --maxfail=30 -p no:cacheprovider 2>&1 | tee "$OUT_DIR/pytest.log" | tail -25
if [ "${GPU_CHECK_CPU_TESTS:-0}" = 1 ]; then  # CI runs these; on the lent GPU they only cost device time
  python3 -m pytest python_tests -m "not cuda" -q --tb=short -rfE --maxfail=30 -p no:cacheprovider 2>&1 | tee -a "$OUT_DIR/pytest.log" | tail -15
fi

if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
  for b in optim_speed moe_speed estimate_check; do python3 bench/$b.py 2>&1 | tee -a "$OUT_DIR/quick.txt" | tail -6; done
  stage done; exit 0
fi

stage "kernel benchmarks (most telling first; one deadline: GPU_CHECK_KERNELS_S, default 420 s after the tests)"
KERNELS_S=${GPU_CHECK_KERNELS_S:-420}; K0=$SECONDS
kbudget() { local l=$(( KERNELS_S - SECONDS + K0 )); (( l > $1 )) && l=$1; (( l < 5 )) && l=5; echo $l; }
# wall vs GPU-busy vs CUDA graph, decode kernels (CUDA cores, tensor cores, off), optimizer kernels, and
# the issues' targets read off the rows at the end
timeout "$(kbudget 180)" python3 bench/profile_gpu.py --json "$OUT_DIR/profile.json" 2>&1 | grep -v Warning \
  | tee "$OUT_DIR/profile.txt" | tail -75
stage "host time per layer call (tiny shape: launch overhead only)"
timeout "$(kbudget 40)" python3 bench/host_overhead.py --json "$OUT_DIR/host_overhead.json" 2>&1 \
  | tee "$OUT_DIR/host_overhead.txt" | tail -10
stage "fused RMSNorm and SwiGLU activation vs the transformers modules"
timeout "$(kbudget 60)" python3 bench/norm_act_speed.py --json "$OUT_DIR/norm_act.json" 2>&1 \
  | tee "$OUT_DIR/norm_act.txt" | tail -14
stage "linear layer vs dense and bitsandbytes + PEFT"
timeout "$(kbudget 120)" python3 bench/linear_speed.py --cpu-dtypes float32 --json "$OUT_DIR/linear_speed.json" 2>&1 \
  | tee "$OUT_DIR/linear_speed.txt" | tail -30
stage "optimizer, MoE gate, quantization"
timeout "$(kbudget 60)" python3 bench/optim_speed.py 2>&1 | tee -a "$OUT_DIR/linear_speed.txt" | tail -5
timeout "$(kbudget 60)" python3 bench/moe_speed.py 2>&1 | tee -a "$OUT_DIR/linear_speed.txt" | tail -4
timeout "$(kbudget 60)" python3 bench/quant_speed.py --json /tmp/quant_speed.json 2>&1 | tee "$OUT_DIR/quant_speed.txt" | tail -12
if [ -n "$TESTS_K" ]; then
  stage "the other CUDA tests"
  timeout "${GPU_CHECK_REST_S:-150}" python3 -m pytest python_tests -m cuda -k "not ($TESTS_K)" -q --tb=short -rfE \
    --maxfail=30 -p no:cacheprovider 2>&1 | tee -a "$OUT_DIR/pytest.log" | tail -20
fi
fi

if [ "$PART" != kernels ]; then
stage "headline (time-boxed): 65B and 8B shapes under a 48 GiB cap, 7B end-to-end"
# 7B first (the step time against bf16 LoRA and bitsandbytes), then direct probes of the target lengths
# (65B >= 32K, 8B >= 200K: one step each, the 8B one last: it may not finish); --search bisects instead,
# which at 100K+ tokens costs minutes per probe. One deadline for the part (GPU_CHECK_HEADLINE_S, default
# 480 s after the build), each step capped by what is left; every script reports as it goes. The 8B
# probe is one step over 204,800 tokens (~1e16 FLOP of attention alone: a minute or more).
HEADLINE_S=${GPU_CHECK_HEADLINE_S:-480}; H0=$SECONDS
budget() { local l=$(( HEADLINE_S - SECONDS + H0 )); (( l > $1 )) && l=$1; (( l < 5 )) && l=5; echo $l; }
# (session 12, H200: 65B 512/2048/16384/32768 took 1 / 2 / 31 / 51 s a step; the 8B 204,800-token step
# did not finish in 150 s)
stage "7B end to end"
timeout "$(budget 100)" python3 bench/e2e_train.py --shape 7b 2>&1 | tee "$OUT_DIR/headline.txt" | tail -8
stage "65B"
timeout "$(budget 150)" python3 bench/memory_65b.py --shape 65b --seqs 2048 --probe 32768 \
  --json "$OUT_DIR/memory_65b.json" --plot "$OUT_DIR/memory_65b.png" 2>&1 | tee -a "$OUT_DIR/headline.txt" | tail -12
stage "8B probe"
timeout "$(budget 270)" python3 bench/memory_65b.py --shape 8b --seqs 2048 --probe 204800 --no-bnb \
  --json "$OUT_DIR/memory_8b.json" 2>&1 | tee -a "$OUT_DIR/headline.txt" | tail -6
stage "estimate check"
timeout "$(budget 30)" python3 bench/estimate_check.py 2>&1 | tee "$OUT_DIR/estimate_check.txt" | tail -5
fi
stage done
