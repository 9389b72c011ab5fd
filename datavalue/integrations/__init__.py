"""Integrations that sit on top of capture: Hugging Face ``transformers.Trainer`` (``hf``)."""
