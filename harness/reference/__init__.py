"""Reference runs: the HF transformers model in fp32 (golden) and bf16 (noise baseline)."""
