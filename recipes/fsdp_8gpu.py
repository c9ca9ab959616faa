"""fsdp_8gpu: the paper's Qwen3-8B setting on one node of 8 GPUs, FSDP2 through torchrun.

Hardware: one node, 8 × 80 GB GPUs (H100/A100), NVLink.   Command:
    torchrun --nproc_per_node 8 popsd.py --recipe fsdp_8gpu
Several nodes: the same command with torchrun --nnodes N --node_rank I --rdzv_endpoint HOST:PORT.
Expected time: not yet measured (no multi-GPU machine in the sessions so far); each step prints its time.
Each rank loads the bf16 model (about 16 GB of host memory per rank), shards it (fully_shard per
decoder layer and on the body, bf16 compute, fp32 gradient reduction), samples and scores 4 of the 32
prompts of a step; the loss is divided by the step's token count over all ranks. Paper settings:
LoRA r64/α128 on all linear layers, lr 5e-6, batch 32, 1 rollout per prompt, 1024 new tokens,
200 steps, checkpoints every 50 (whole adapters: they resume under any number of ranks; every adapter
is kept).
Thinking: on for every context (student, clean base, teacher, reference-only), as the paper's
long-CoT numbers are. Prompts: the OPSD code's wording (prompts=opsd_wording, rollout.PROMPTS).
"""
device = "cuda"  # a CUDA GPU: on a machine without one this recipe stops at once and says so
model = "Qwen/Qwen3-8B"
prompts = "opsd_wording"
student_thinking = True
teacher_thinking = True
dtype = "bf16"
load_in_4bit = False  # FSDP shards the bf16 weights instead
gradient_checkpointing = True
batch_size = 32  # prompts per step over all ranks: 4 per rank on 8 GPUs
micro_batch_size = 2
gen_batch_size = 4  # one generate call per rank and step
steps = 200
save_every = 50
