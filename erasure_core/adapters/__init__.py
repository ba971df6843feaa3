"""Text-encoder adapters: the protocol and layouts (``base``), Hugging Face models (``hf``)."""

from .base import LAYOUTS, EncodedPrompt, EncoderLayout, TextEncoderAdapter, real_token_rows

__all__ = ["LAYOUTS", "EncodedPrompt", "EncoderLayout", "TextEncoderAdapter", "real_token_rows"]
