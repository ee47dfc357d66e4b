"""Text -> token ids for the talker prompt (the Qwen2 tokenizer of the checkpoint, loaded with transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROLE_LEN = 3   # "<|im_start|>assistant\n"
TAIL_LEN = 5   # "<|im_end|>\n<|im_start|>assistant\n"
REF_TAIL_LEN = 2  # "<|im_end|>\n"


def assistant_text(text: str) -> str:
    return f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"


def ref_text(text: str) -> str:
    return f"<|im_start|>assistant\n{text}<|im_end|>\n"


def instruct_text(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n"


@dataclass(frozen=True)
class TargetIds:
    role: list[int]   # "<|im_start|>assistant\n": 3 ids
    text: list[int]   # the text itself


class TextTokenizer:
    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer, PretrainedConfig

        # an empty model config: the class comes from tokenizer_config.json, and transformers does not try to read
        # the checkpoint's config.json (a model type it does not know: one warning per load)
        self._tok = AutoTokenizer.from_pretrained(str(path), config=PretrainedConfig())

    def encode(self, s: str) -> list[int]:
        return list(self._tok(s, add_special_tokens=False)["input_ids"])

    def target(self, text: str) -> TargetIds:
        ids = self.encode(assistant_text(text))
        return TargetIds(role=ids[:ROLE_LEN], text=ids[ROLE_LEN:-TAIL_LEN])

    def ref(self, text: str) -> list[int]:
        return self.encode(ref_text(text))[ROLE_LEN:-REF_TAIL_LEN]

    def instruct(self, text: str) -> list[int]:
        return self.encode(instruct_text(text))

    def split_offsets(self, text: str) -> list[int]:
        """Start offsets of the pre-tokenizer pieces of `text` (BPE never merges across them)."""
        pieces = self._tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        return [start for _, (start, _) in pieces] or [0]

    def text_only(self, s: str) -> list[int]:
        """Ids of a bare text piece, tokenized as it would be inside the assistant turn."""
        return self.target(s).text
