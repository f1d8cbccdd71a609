"""The report stage: its inputs, its Markdown and its plots."""
