"""paper_qwen3_4b: Table 1's Qwen3-4B run (bf16 LoRA).

Hardware: one 40-80 GB GPU.   Command: python popsd.py --recipe paper_qwen3_4b
Expected time: not yet measured. Expected result (paper): base 61.2 → Purified 63.7 / 62.7.
Qwen3-4B ties its input and output embeddings; the output head stays frozen either way.
"""
model = "Qwen/Qwen3-4B"
micro_batch_size = 4
