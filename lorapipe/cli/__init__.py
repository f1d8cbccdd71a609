"""Command-line tools: chat, export, profiles."""
