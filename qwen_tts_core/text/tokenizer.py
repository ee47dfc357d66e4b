"""Text -> token ids for the talker prompt (the Qwen2 tokenizer of the checkpoint, loaded with transformers)."""

from __future__ import annotations

import re
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


# The tokenizer classes a Qwen3-TTS checkpoint may name (transformers builds the fast one from either).
TOKENIZER_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")


def check_tokenizer_config(folder: Path) -> None:
    """Refuse a tokenizer other than transformers' own Qwen2 one: tokenizer_config.json must name a Qwen2 tokenizer
    class. With such a class an `auto_map` beside it is never followed (trust_remote_code=False below), so it is left
    alone: code is never run from a checkpoint, and a checkpoint that carries one still loads."""
    from ..checkpoint.weights import read_json

    path = folder / "tokenizer_config.json"
    if not path.is_file():
        raise ValueError(f"{folder}: missing tokenizer_config.json (the Qwen2 tokenizer files are vocab.json, "
                         "merges.txt, tokenizer_config.json)")
    raw = read_json(path)
    cls = raw.get("tokenizer_class") if isinstance(raw, dict) else None
    if cls not in TOKENIZER_CLASSES:
        raise ValueError(f"{path}: tokenizer_class must be one of {list(TOKENIZER_CLASSES)}, got {cls!r}")


# The tokenizer files transformers reads ids from, in the order an offending id is looked for to name its file.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "added_tokens.json", "tokenizer_config.json")


def _file_with_id(path: Path, token_id: int) -> Path:
    """The tokenizer file of `path` that gives some token the id `token_id` (the folder when none is found)."""
    from ..checkpoint.weights import read_json

    for name in _TOKENIZER_FILES:
        f = path / name
        if not f.is_file():
            continue
        try:
            raw = read_json(f)
        except ValueError:
            continue
        if name == "tokenizer.json":
            vocab = (raw.get("model") or {}).get("vocab")
            ids = list(vocab.values()) if isinstance(vocab, dict) else []
            ids += [t.get("id") for t in raw.get("added_tokens") or [] if isinstance(t, dict)]
        elif name == "tokenizer_config.json":
            ids = [int(k) for k in raw.get("added_tokens_decoder") or {} if str(k).isdigit()]
        else:
            ids = list(raw.values())
        if token_id in ids:
            return f
    return path


class TextTokenizer:
    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer, PretrainedConfig

        check_tokenizer_config(Path(path))
        # an empty model config: the class comes from tokenizer_config.json, and transformers does not try to read
        # the checkpoint's config.json (a model type it does not know: one warning per load). trust_remote_code=False:
        # never import code from the checkpoint, and never ask on stdin
        self._tok = AutoTokenizer.from_pretrained(str(path), config=PretrainedConfig(), trust_remote_code=False)
        # the added tokens ("<|im_end|>", "<tts_pad>", ...): found in a text before BPE sees it, the longest first
        added = sorted({t.content for t in self._tok.added_tokens_decoder.values() if t.content}, key=len,
                       reverse=True)
        self._added = re.compile("|".join(map(re.escape, added))) if added else None
        self._added_prefixes = {t[:k] for t in added for k in range(1, len(t))}
        self._added_max = max(map(len, added), default=0)

    def check_special_ids(self, im_start: int, im_end: int, where: str) -> None:
        """ValueError unless <|im_start|> and <|im_end|> encode to the config's ids (a tokenizer from another model
        built every prompt with the wrong markers)."""
        for token, want in (("<|im_start|>", im_start), ("<|im_end|>", im_end)):
            got = self.encode(token)
            if got != [want]:
                raise ValueError(f"{where}: the tokenizer encodes {token} as {got[:4]}, but config.json says "
                                 f"{want} (a tokenizer of another model?)")

    def vocab(self) -> dict[str, int]:
        """Every token the tokenizer can produce and its id, added tokens included."""
        return dict(self._tok.get_vocab())

    def check_ids_below(self, text_vocab_size: int, folder: Path) -> None:
        """Every id this tokenizer can produce (its vocabulary and added tokens) must index the talker's text
        embedding: an id beyond it failed each request that used the token (IndexError; a device-side assert on
        CUDA). ValueError naming the tokenizer file that holds the id."""
        vocab = self.vocab()
        if not vocab:
            return
        token, token_id = max(vocab.items(), key=lambda kv: kv[1])
        if token_id >= text_vocab_size:
            raise ValueError(f"{_file_with_id(folder, token_id)}: token {token!r} has id {token_id}, beyond the "
                             f"talker's text vocabulary ({folder / 'config.json'} talker_config.text_vocab_size = "
                             f"{text_vocab_size}; a tokenizer of another model?)")

    def encode(self, s: str) -> list[int]:
        return list(self._tok(s, add_special_tokens=False)["input_ids"])

    def target(self, text: str) -> TargetIds:
        ids = self.encode(assistant_text(text))
        return TargetIds(role=ids[:ROLE_LEN], text=ids[ROLE_LEN:-TAIL_LEN])

    def ref(self, text: str) -> list[int]:
        return self.encode(ref_text(text))[ROLE_LEN:-REF_TAIL_LEN]

    def instruct(self, text: str) -> list[int]:
        return self.encode(instruct_text(text))

    def normalize(self, text: str) -> str:
        """`text` as the tokenizer sees it before its pre-tokenizer (its normalizer: NFC for Qwen2's): the added
        tokens found first and kept as written, the stretches between them normalized ("<|im_end|>" + U+0338 would
        compose its ">" into one character and lose the token)."""
        norm = self._tok.backend_tokenizer.normalizer
        if norm is None:
            return text
        if self._added is None:
            return norm.normalize_str(text)
        out, at = [], 0
        for m in self._added.finditer(text):
            out += [norm.normalize_str(text[at:m.start()]), m.group()]
            at = m.end()
        return "".join(out) + norm.normalize_str(text[at:])

    def split_offsets(self, text: str) -> list[int]:
        """Start offsets of the pieces `text` is tokenized in (BPE never merges across them): an added token found in
        it is one piece, and the text between is cut by the pre-tokenizer, each stretch on its own, as the tokenizer
        does."""
        pre = self._tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str
        starts, at = [], 0
        for m in self._added.finditer(text) if self._added is not None else ():
            starts += [at + start for _, (start, _) in pre(text[at:m.start()])] + [m.start()]
            at = m.end()
        starts += [at + start for _, (start, _) in pre(text[at:])]
        return starts or [0]

    def open_added_token(self, text: str) -> int:
        """Where an added token may still be forming at the end of `text` (its end is the start of one, or a token
        that a longer one extends): the offset it starts at; len(text) when there is none. Text from there on is not
        final yet."""
        for i in range(max(0, len(text) - self._added_max + 1), len(text)):
            if text[i:] in self._added_prefixes:
                return i
        return len(text)

    def text_only(self, s: str) -> list[int]:
        """Ids of a bare text piece, tokenized as it would be inside the assistant turn."""
        return self.target(s).text
