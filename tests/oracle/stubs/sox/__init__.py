"""Stand-in for sox: imported by the official package's 25Hz tokenizer only, never used by 12Hz models."""


def __getattr__(name):
    raise ImportError(f"sox.{name} is a stub in the oracle environment")
