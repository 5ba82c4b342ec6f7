# run 10, call 1: Nsight Compute on the best config (s5_pingpong_rowbox_split), the block (mode 0) and the main
# loop alone (mode 2), bf16 and fp32, NCHW output: pipes, shared memory, issue slots and stall samples
export MISHOPS_CACHE_DIR=/tmp/mishops-cache PYTHONUNBUFFERED=1
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > $OUT/env.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $OUT/env.txt 2>&1
ncu --version | tail -n 1 >> $OUT/env.txt
PROFILE_DTYPE=bf16 PROFILES="s5_pingpong_rowbox_split:0 s5_pingpong_rowbox_split:2" bash benchmarks/profile_hopper_conv.sh
PROFILES="s5_pingpong_rowbox_split:0" bash benchmarks/profile_hopper_conv.sh
