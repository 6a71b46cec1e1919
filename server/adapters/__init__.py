"""Adapters: PEFT file formats, the catalog (API threads), residency (engine thread), batched LoRA."""
