"""Instruction-tuning with LoRA/QLoRA as a DVC pipeline: the logic behind stages/."""

__version__ = "0.1.0"
