"""A tiny byte-level BPE text tokenizer saved in the Qwen2 tokenizer file layout, for random-weight checkpoints.

It keeps what the model code relies on: the Qwen2 pre-tokenizer regex, the real special-token ids
(<|im_start|> 151644, <|im_end|> 151645, tts_pad/bos/eos 151671-151673), "<|im_start|>assistant\\n" as exactly three
tokens and "<|im_end|>\\n<|im_start|>assistant\\n" as exactly five.
"""

from __future__ import annotations

import json
from pathlib import Path

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<tts_pad>": 151671, "<tts_text_bos>": 151672, "<tts_text_eod>": 151673,
}
_CORPUS = """assistant user system assistant user
The quick brown fox jumps over the lazy dog. Hello world, this is a test of speech synthesis.
Speak in a warm, calm voice. A cheerful young woman with a bright tone. Read the chapter slowly.
Once upon a time there was a small village by the sea. It was the best of times, it was the worst of times.
Please hold while we connect your call. Press one for sales, two for support. Thank you for waiting.
Good morning! How are you today? I am fine, thanks. Numbers: 0 1 2 3 4 5 6 7 8 9.
你好，世界。今天天气很好。我们一起去公园吧！こんにちは、元気ですか。안녕하세요.
Bonjour le monde. Hallo Welt. Hola mundo. Ciao mondo. Olá mundo. Привет мир.
"""


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> None:
    """Train a small BPE on a built-in corpus and write vocab.json, merges.txt, tokenizer.json and
    tokenizer_config.json (Qwen2TokenizerFast) into out_dir."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    # as the real Qwen2 tokenizer.json: transformers 5's Qwen2Tokenizer applies NFC whatever the file says, 4.x
    # (the official package's) what the file says; without it the two tokenized decomposed accents differently
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=1)
    # paragraphs too: the real vocabulary has "\n\n", which merges a text's leading newline into the role's
    # "assistant\n" (a case the prompt must follow as the reference does)
    tok.train_from_iterator([_CORPUS] * 20 + ["assistant\n"] * 50 + ["user\n"] * 50 + ["\n\n"] * 50,
                            trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    for word in ("assistant", "user"):
        if word not in vocab:
            raise RuntimeError(f"tiny tokenizer failed to learn {word!r}")

    # the specials live in the model vocab at their real ids, so every loader keeps those ids
    vocab = {**vocab, **SPECIAL_TOKENS}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")

    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for t, i in SPECIAL_TOKENS.items()
    ]
    full = json.loads(tok.to_str())
    full["added_tokens"] = added
    full["model"]["merges"] = merges
    full["model"]["vocab"] = vocab
    (out / "tokenizer.json").write_text(json.dumps(full, ensure_ascii=False))
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 32768,
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
