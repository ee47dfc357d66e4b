"""qwen_tts_core: an inference engine for the official Qwen3-TTS 12Hz checkpoints.

Data flow: text -> prompt (text/prompt.py) -> talker step (model/talker.py) -> code predictor
(model/code_predictor.py) -> frame codes -> codec chunk (codec/) -> float32 PCM at 24 kHz.
"""

from .api import Qwen3TTSModel
from .checkpoint.build import make_checkpoint
from .generate.engine import Engine, EngineBusy
from .generate.session import Session
from .speech_tokenizer import Qwen3TTSTokenizer
from .types import SAMPLE_RATE, AudioChunk, SamplingParams, SynthesisRequest
from .voice_prompt import VoiceClonePromptItem, load_voice_prompt, save_voice_prompt

__all__ = [
    "Qwen3TTSModel", "Engine", "EngineBusy", "Session", "SynthesisRequest", "SamplingParams", "AudioChunk",
    "VoiceClonePromptItem", "save_voice_prompt", "load_voice_prompt", "make_checkpoint", "SAMPLE_RATE",
    "Qwen3TTSTokenizer",
]
