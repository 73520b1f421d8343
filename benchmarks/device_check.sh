#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run of under 10 minutes, on a machine whose python3 has
# torch, pytest and hypothesis and that may have no network (nothing is downloaded):
#
#     bash benchmarks/device_check.sh [OUT]        # OUT: where logs and results go (default device-check)
#
# 1. tests/test_cuda.py: every solver's meta-gradients and meta-training on the GPU against the
#    CPU in float64, checkpoints, shipped-parameter files, task sampling and seeded dropout there.
# 2. The solver benchmark, fewshot only (the peers run on the CPU only): MAML, FOMAML, Reptile and
#    IMAML on the Omniglot workload at 1 and 5 inner steps on the GPU, then the same on the
#    machine's CPU cores, each a table (bench_solvers.py --device; results JSON in OUT).
# 3. The default test suite, where device="auto" means the GPU, in the time left (TEST_SECONDS),
#    listing every failure: a test written for the CPU (a reference tensor made there, a repr
#    that names it) fails there as a library bug would, and each needs a look.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-device-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
status=0
step() { echo; echo "== $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/machine.txt"
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$out/machine.txt"
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())" | tee -a "$out/machine.txt"
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "device_check: torch sees no CUDA device" >&2; exit 1; }

# fewshot itself, without its dependencies (torch and the rest are the machine's own); a plain
# PYTHONPATH where even that cannot be installed.
"$python" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 \
    || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step "tests/test_cuda.py (GPU against CPU, float64)"
timeout 120 "$python" -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tee "$out/test_cuda.log" \
    || status=1

threads=$(nproc)
bench=(benchmarks/bench_solvers.py --no-peers --workloads omniglot --inner-steps 1,5
       --solvers MAML,FOMAML,Reptile,IMAML --steps 5 --warmup 2 --rounds 1 --timeout 120)
step "solver benchmark on cuda"
timeout 150 "$python" "${bench[@]}" --device cuda --threads "$threads" --output "$out/bench-cuda.json" \
    2>&1 | tee "$out/bench-cuda.log" || status=1
step "solver benchmark on the CPU ($threads threads)"
timeout 120 "$python" "${bench[@]}" --device cpu --threads "$threads" --no-flops --output "$out/bench-cpu.json" \
    2>&1 | tee "$out/bench-cpu.log" || status=1

step "the default test suite on cuda (device='auto')"
workers=$(( threads > 8 ? 8 : threads ))
xdist=()
"$python" -c "import xdist" 2> /dev/null && xdist=(-n "$workers")
timeout "${TEST_SECONDS:-150}" "$python" -m pytest tests -q -rf --maxfail=50 -p no:cacheprovider "${xdist[@]}" \
    2>&1 | tee "$out/tests.log" || status=1

echo
echo "device_check: $([ "$status" -eq 0 ] && echo "all passed" || echo "FAILED (logs in $out)")"
exit "$status"
