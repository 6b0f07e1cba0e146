"""Native GLM-4V-9B (THUDM/glm-4v-9b, ``model_type: "chatglm"``) for current transformers, no remote code."""

from .chat_template import Message, Prompt, build_prompt, expanded_length, generation_prompt
from .config import ChatGLMConfig, VisionConfig
from .image_processor import ImageError, ImageProcessor, open_image
from .kv_cache import KVCache
from .modeling import ChatGLMForConditionalGeneration
from .sampling import SamplingParams
from .tokenizer import GLM4Tokenizer, IncrementalDetokenizer


def _register_with_transformers() -> None:
    """Make ``AutoModelForCausalLM.from_pretrained(<glm-4v-9b folder>)`` pick this class, no remote code needed.

    The official config.json carries an ``auto_map`` to remote code; with ``model_type: "chatglm"`` registered
    locally, transformers uses the local class unless ``trust_remote_code=True`` is passed explicitly.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        AutoConfig.register("chatglm", ChatGLMConfig)
        AutoModel.register(ChatGLMConfig, ChatGLMForConditionalGeneration)
        AutoModelForCausalLM.register(ChatGLMConfig, ChatGLMForConditionalGeneration)
    except ValueError:  # already registered (a future transformers with its own "chatglm"): leave it alone
        pass


_register_with_transformers()

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
    "expanded_length",
    "generation_prompt",
    "open_image",
]
