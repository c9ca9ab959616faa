"""paper_qwen3_4b: Table 1's Qwen3-4B run (bf16 LoRA).

Hardware: one 40-80 GB GPU.   Command: python popsd.py --recipe paper_qwen3_4b
Expected time: not yet measured. Expected result (paper): base 61.2 → Purified 63.7 / 62.7.
Qwen3-4B ties its input and output embeddings; the output head stays frozen either way.
Thinking: on for every context (student, clean base, teacher, reference-only), as the paper's
long-CoT numbers are. Prompts: the OPSD code's wording (prompts=opsd_wording, rollout.PROMPTS).
Checkpoints every 50 steps, every adapter kept: evaluate them all (best step) with
python eval.py --adapter runs/paper_qwen3_4b/checkpoints, or through vLLM with --server (docs/evaluation.md).
"""
device = "cuda"  # a CUDA GPU: on a machine without one this recipe stops at once and says so
model = "Qwen/Qwen3-4B"
prompts = "opsd_wording"
student_thinking = True
teacher_thinking = True
micro_batch_size = 4
