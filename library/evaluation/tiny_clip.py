"""A tiny random CLIP and aesthetic MLP written to disk, for tests and benchmarks (no download).

``make_tiny_clip(folder)`` saves a ``CLIPModel`` with small text/vision towers, the small BPE tokenizer
of :mod:`library.tiny_sdxl` and a ``CLIPImageProcessor`` with a small size, so that
``CLIPModel.from_pretrained(folder)`` / ``CLIPProcessor.from_pretrained(folder)`` work offline.
``make_random_aesthetic(path, input_size)`` saves a random MLP in the published LAION key layout.
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_clip(folder: str | Path, seed: int = 0, projection_dim: int = 16, image_size: int = 32,
                   patch_size: int = 8, vision_width: int = 32, vision_layers: int = 2) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from library.tiny_sdxl import vocab_size, write_tokenizer_files

    folder = Path(folder)
    write_tokenizer_files(folder)
    eos = vocab_size() - 1
    text = dict(vocab_size=vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=eos - 1, eos_token_id=eos,
                pad_token_id=eos)
    vision = dict(hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=vision_layers,
                  num_attention_heads=4,
                  image_size=image_size, patch_size=patch_size)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(folder))
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return folder


def random_aesthetic_state(input_size: int, seed: int = 0) -> dict:
    """Random weights in the published key layout (``layers.0/2/4/6/7``), with some spread."""
    import torch

    from library.evaluation.aesthetic import expected_shapes

    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) * (0.5 / (shape[-1] ** 0.5))
            for key, shape in expected_shapes(input_size).items()}


def make_random_aesthetic(path: str | Path, input_size: int, seed: int = 0) -> Path:
    """Save a random aesthetic MLP as ``.pth`` (torch.save) or ``.safetensors`` by ``path``'s suffix."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = random_aesthetic_state(input_size, seed)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return path
