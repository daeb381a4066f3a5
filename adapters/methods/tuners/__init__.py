"""peft tuners of our own (imported when a model is adapted: they import peft)."""
