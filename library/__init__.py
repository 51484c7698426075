"""sdxl-poster: a kohya-style SDXL full fine-tuning toolkit.

Modules here are small and each named for one thing; the scripts at the top level
(`sdxl_train.py`), in `tools/` and in `finetune/` wire them together.
"""
