"""Prompt construction: templates (pure string rendering) and k-shot exemplars."""
