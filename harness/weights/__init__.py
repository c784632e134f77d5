"""Weights: local Hugging Face checkpoints (safetensors only) or seeded synthetic weights."""
