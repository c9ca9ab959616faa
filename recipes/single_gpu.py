"""single_gpu: Purified OPSD on one 24 GB card with 4-bit QLoRA, paper settings.

Hardware: one 24 GB GPU (RTX 3090/4090, A5000, L4).   Command: python popsd.py --recipe single_gpu
Expected time: not yet measured (no GPU in the sessions so far); generation dominates each step.
Model: Qwen3-8B in nf4 (about 5.5 GB of weights). If it does not fit your card, use
model=Qwen/Qwen3-4B. Data: the OPSD training set. Paper: LoRA r64/α128 on all linear layers,
lr 5e-6, batch 32, 1 rollout per prompt, 1024 new tokens, ≤ 200 steps, checkpoints every 50
(every adapter kept: evaluate them all with eval.py --adapter runs/single_gpu/checkpoints).
Thinking: on for every context (student, clean base, teacher, reference-only), as the paper's
long-CoT numbers are. Prompts: the OPSD code's wording (prompts=opsd_wording, rollout.PROMPTS).
"""
device = "cuda"  # a CUDA GPU: on a machine without one this recipe stops at once and says so
model = "Qwen/Qwen3-8B"
data = "siyanzhao/Openthoughts_math_30k_opsd"
prompts = "opsd_wording"
student_thinking = True
teacher_thinking = True
load_in_4bit = True  # the one key that makes it fit 24 GB
dtype = "bf16"
gradient_checkpointing = True
optim = "paged_adamw_8bit"  # 8-bit Adam states (bitsandbytes), paged out under memory pressure
micro_batch_size = 1  # with accumulation: the loss is normalised over the whole step
gen_batch_size = 16
steps = 200
save_every = 50
