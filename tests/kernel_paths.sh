#!/usr/bin/env bash
# Runs the numerical tests once per CPU kernel path this machine offers (not part of CI; ~3 min per path on 2 cores):
#   ATen's vectorised kernels  ATEN_CPU_CAPABILITY=default|avx2|avx512 (avx512 only where the CPU has it),
#   oneDNN's                   ONEDNN_MAX_CPU_ISA=SSE41|AVX|AVX2|AVX512_CORE|AVX512_CORE_BF16|AVX512_CORE_AMX,
#   MKL's GEMM                 MKL_CBWR=COMPATIBLE (MKL's portable code path; MKL_ENABLE_INSTRUCTIONS has no
#                              effect on AMD CPUs), and all three at their most portable setting together.
# Each path prints the pytest summary and the DDP test's margins (worst measured / bound per comparison, from
# LOCA_ERROR_REPORT). Usage: tests/kernel_paths.sh [OUT_DIR] [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/loca-kernel-paths}; shift || true
mkdir -p "$out"
tests="tests/test_parity.py tests/test_model.py tests/test_losses.py tests/test_views.py tests/test_geometry.py
       tests/test_scale.py tests/test_ablations.py tests/test_finetune.py tests/test_train.py"
# the DDP comparisons (the signal and restart tests compute nothing kernel-dependent)
tests="$tests tests/test_distributed.py::test_two_gloo_processes_equal_one_process_and_resume_with_another_world_size
       tests/test_distributed.py::test_ablation_switches_under_two_gloo_processes_equal_one_process"
flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $flags " == *" $1 "* ]]; }

paths=("native" "ATEN_CPU_CAPABILITY=default")
has avx2 && paths+=("ATEN_CPU_CAPABILITY=avx2")
has avx512f && has avx512bw && has avx512vl && has avx512dq && paths+=("ATEN_CPU_CAPABILITY=avx512")
paths+=("ONEDNN_MAX_CPU_ISA=SSE41")
has avx && paths+=("ONEDNN_MAX_CPU_ISA=AVX")
has avx2 && paths+=("ONEDNN_MAX_CPU_ISA=AVX2")
has avx512f && paths+=("ONEDNN_MAX_CPU_ISA=AVX512_CORE")
has avx512_bf16 && paths+=("ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16")
has amx_tile && paths+=("ONEDNN_MAX_CPU_ISA=AVX512_CORE_AMX")
paths+=("MKL_CBWR=COMPATIBLE" "ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_CBWR=COMPATIBLE")

echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); vector flags:" \
  "$(tr ' ' '\n' <<<"$flags" | grep -E '^(avx|amx)' | sort | tr '\n' ' ')"
python -c "import torch, numpy; print('torch', torch.__version__, '| numpy', numpy.__version__)"
for path in "${paths[@]}"; do
  name=$(tr ' =' '_-' <<<"$path")
  settings=(); [ "$path" != native ] && read -ra settings <<<"$path"
  capability=$(env "${settings[@]}" python -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
  start=$(date +%s)
  env "${settings[@]}" LOCA_ERROR_REPORT="$out/$name.json" \
    python -m pytest -q -p no:cacheprovider $tests "$@" >"$out/$name.log" 2>&1
  status=$?
  echo "== $path (ATen reports $capability): $(tail -1 "$out/$name.log") [exit $status, $(( $(date +%s) - start )) s]"
  [ -e "$out/$name.json" ] && python -c "import json, sys; print('   DDP margins (measured / bound):',
    ', '.join(f'{k} {v:.3f}' for k, v in json.load(open(sys.argv[1])).items()))" "$out/$name.json"
done
