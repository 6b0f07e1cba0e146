"""glm4v-edge: quantized, low-VRAM, OpenAI-compatible serving of GLM-4V-9B."""

__version__ = "0.1.0"  # also in pyproject.toml
