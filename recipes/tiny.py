"""tiny: the whole pipeline on a laptop CPU in under a minute.

Hardware: any CPU.   Command: python popsd.py --recipe tiny   Expected time: ~20-40 s.
A random-init 2-layer Qwen3 (H=64) and a BPE tokenizer are built in the run from the bundled toy
math data. Its numbers mean nothing: it shows that sampling, the four scoring passes, the loss,
the update, logging and checkpoints all run.
"""
model = "tiny"  # built into runs/tiny/tiny_model from the data below
data = "data/toy_math.jsonl"
dtype = "fp32"
device = "cpu"
threads = 1  # one torch thread: faster at this size, and the same on every machine
gradient_checkpointing = False  # nothing to save at this size
student_thinking = False  # a random model never closes a <think> block
teacher_thinking = False
lora_r = 8
lora_alpha = 16
max_prompt_len = 512
max_new_tokens = 32
temperature = 1.0
top_k = 0
steps = 20
batch_size = 8
micro_batch_size = 4
gen_batch_size = 8
lr = 1e-3
warmup_steps = 2
max_grad_norm = 1.0
save_every = 10
eval_every = 10  # held-out toy problems before step 1, at step 10 and at step 20
eval_bench = "data/toy_math_test.jsonl"
eval_n = 2
eval_limit = 8
eval_max_new_tokens = 32
