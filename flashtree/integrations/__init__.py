"""Integrations with other libraries (HF transformers), through their public APIs only."""
