"""Live chat with history: ``python -m examples.shoutbox``."""
