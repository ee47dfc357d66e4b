"""Only the 25Hz tokenizer uses kaldi features; the 12Hz models never call this."""


def __getattr__(name):
    raise ImportError(f"torchaudio.compliance.kaldi.{name} is a stub in the oracle environment")
