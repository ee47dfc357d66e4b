"""The 12Hz speech tokenizer (codec): config, decoder (offline + exact streaming), Mimi encoder, builder, loader.

Public API:
    load_codec(dir_or_path, device="cpu", dtype=torch.float32) -> Codec
    Codec.encode(audios) / .decode(codes) / .new_stream(batch_size) / .decode_chunk(codes, state)
    CodecDecoder(cfg).decode(codes) / .new_state(batch_size) / .decode_chunk(codes, state)
        / .decode_rows(codes, state, lengths)   (right-padded chunk, per-row lengths: rows out of step in one call)
    CodecStreamState (.reset(mask), .select(rows), .scatter_(rows, sub), .zero_rows_(rows), .concat(states))
    StreamRows(decoder, rows): many rows' streaming state in batched buffers, decoded together
    CodecConfig (.from_json, .to_json_dict), tiny_config(), full_config()
    write_random_speech_tokenizer(out_dir, size="tiny", seed=0, dtype=torch.float32)
"""

from .build import write_random_speech_tokenizer
from .config import CodecConfig, full_config, preset, tiny_config
from .decoder import CodecDecoder, check_codes
from .load import Codec, load_codec
from .rows import StreamRows
from .state import CodecStreamState

__all__ = [
    "Codec",
    "CodecConfig",
    "CodecDecoder",
    "CodecStreamState",
    "check_codes",
    "full_config",
    "load_codec",
    "preset",
    "StreamRows",
    "tiny_config",
    "write_random_speech_tokenizer",
]
