"""paper_qwen3_8b: Table 1's Qwen3-8B run (bf16 LoRA, no quantisation).

Hardware: one 80 GB GPU (H100/A100).   Command: python popsd.py --recipe paper_qwen3_8b
Expected time: not yet measured. Expected result (paper, avg of AIME24/25 and HMMT25, avg@12):
base 61.8 → Purified 66.0 (DASD-10K) / 65.1 (Math-CoT-20K); those datasets are not on the hub,
so this recipe uses the OPSD set. Paper settings are the Config defaults; this file names the model.
Thinking: on for every context (student, clean base, teacher, reference-only), as the paper's
long-CoT numbers are. Prompts: the OPSD code's wording (prompts=opsd_wording, rollout.PROMPTS).
Checkpoints every 50 steps, every adapter kept: the paper reports the best of steps 50-200
(python eval.py --adapter runs/paper_qwen3_8b/checkpoints, or through vLLM with --server: docs/evaluation.md).
"""
device = "cuda"  # a CUDA GPU: on a machine without one this recipe stops at once and says so
model = "Qwen/Qwen3-8B"
prompts = "opsd_wording"
student_thinking = True
teacher_thinking = True
micro_batch_size = 2
