"""Stand-in for torchaudio inside the oracle virtualenv (see tests/oracle/README.md)."""
