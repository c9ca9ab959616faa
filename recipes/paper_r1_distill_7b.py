"""paper_r1_distill_7b: Table 1's DeepSeek-R1-Distill-Qwen-7B run (bf16 LoRA).

Hardware: one 80 GB GPU.   Command: python popsd.py --recipe paper_r1_distill_7b
Expected time: not yet measured. Expected result (paper): base 38.7 → Purified 40.8 on both sets.
Differs from Qwen3: its chat template always opens a <think> block (no enable_thinking switch),
so every role thinks; sampling at the DeepSeek-R1 temperature 0.6 is NOT used for training.
Prompts: the OPSD code's wording (prompts=opsd_wording).
Checkpoints every 50 steps, every adapter kept: evaluate them all (best step) with
python eval.py --adapter runs/paper_r1_distill_7b/checkpoints, or through vLLM with --server
(docs/evaluation.md).
"""
device = "cuda"  # a CUDA GPU: on a machine without one this recipe stops at once and says so
model = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
prompts = "opsd_wording"
student_thinking = True
teacher_thinking = True
micro_batch_size = 2
