"""Native GLM-4V-9B (THUDM/glm-4v-9b, ``model_type: "chatglm"``) for current transformers, no remote code."""

from .chat_template import Message, Prompt, build_prompt
from .config import ChatGLMConfig, VisionConfig
from .image_processor import ImageError, ImageProcessor, open_image
from .kv_cache import KVCache
from .modeling import ChatGLMForConditionalGeneration
from .sampling import SamplingParams
from .tokenizer import GLM4Tokenizer, IncrementalDetokenizer

__all__ = [
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "GLM4Tokenizer",
    "ImageError",
    "ImageProcessor",
    "IncrementalDetokenizer",
    "KVCache",
    "Message",
    "Prompt",
    "SamplingParams",
    "VisionConfig",
    "build_prompt",
    "open_image",
]
