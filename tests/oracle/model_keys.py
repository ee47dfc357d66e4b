"""Oracle: the tensor names the official Qwen3TTSModel keeps (its state_dict: what save_pretrained writes, so
what an official checkpoint holds), for a checkpoint folder.

    python model_keys.py CKPT OUT.json   -> OUT.json: sorted list of names
"""

from __future__ import annotations

import json
import sys

from qwen_tts import Qwen3TTSModel


def main() -> None:
    ckpt, out = sys.argv[1], sys.argv[2]
    model = Qwen3TTSModel.from_pretrained(ckpt, device_map="cpu")
    with open(out, "w") as f:
        json.dump(sorted(model.model.state_dict()), f)


if __name__ == "__main__":
    main()
