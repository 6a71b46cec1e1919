"""Adapters: PEFT file formats, the registry, batched LoRA."""
