"""The only code that touches ComfyUI objects (ModelPatcher, CLIP).

Model-family specs (``families``), ComfyUI text encoders as core adapters
(``clip_encoder``), applying patches on clones, capture during sampling, and the
per-method fit functions the "Fit Concept Eraser" node calls.
"""
