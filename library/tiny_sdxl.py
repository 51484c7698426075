"""A tiny SDXL that has real SDXL's structure, built from a seed with no download.

The UNet has 3 levels with ``text_time`` conditioning (the same SGM key layout as SDXL: 9 input
blocks, a middle block, 9 output blocks), TE1 is a ``CLIPTextModel``, TE2 a
``CLIPTextModelWithProjection`` of a different width (diffusers tells them apart by width), the VAE
has 4 levels. The tokenizers are byte-level BPE CLIP tokenizers written from a small vocabulary.

``tools/make_tiny_sdxl.py`` writes it to disk; the tests build their fixtures with the same code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from library.sdxl_configs import SDXL_SCHEDULER_CONFIG, TOKENIZER_IDS

TINY_TE1 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
TINY_TE2 = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=TINY_TE1["hidden_size"] + TINY_TE2["hidden_size"],
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TINY_TE2["hidden_size"] + 6 * 8,
    use_linear_projection=True,
    norm_num_groups=32,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=128,
    scaling_factor=0.13025,
    force_upcast=True,
)

# A few merges so that common words become single tokens (the rest falls back to bytes).
_MERGES = [
    ("t", "h"), ("th", "e</w>"), ("o", "n</w>"), ("a", "n"), ("an", "d</w>"), ("p", "o"), ("po", "s"),
    ("pos", "t"), ("e", "r</w>"), ("post", "er</w>"), ("m", "o"), ("mo", "v"), ("i", "e</w>"),
    ("mov", "ie</w>"), ("c", "a"), ("ca", "t</w>"), ("b", "a"), ("ba", "g</w>"), ("o", "f</w>"),
    ("i", "n</w>"), ("w", "h"), ("wh", "i"), ("whi", "t"), ("whit", "e</w>"),
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_tokenizer_files(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write a small CLIP BPE tokenizer (vocab.json, merges.txt, configs) to ``folder``.

    ``"!"`` gets id 0, as in CLIP's real vocabulary (SDXL's second tokenizer pads with it).
    """
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in _MERGES]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in _MERGES) + "\n"
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=list(_MERGES),
        model_max_length=77,
        pad_token=pad_token,
    )
    tokenizer.save_pretrained(str(folder))
    return folder


def vocab_size() -> int:
    return 512 + len(_MERGES) + 2


@dataclass
class TinySDXL:
    unet: object
    vae: object
    text_encoder1: object
    text_encoder2: object


def _text_config(shape: dict, hidden_act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    eos = vocab_size() - 1
    return CLIPTextConfig(
        vocab_size=vocab_size(),
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=eos - 1,
        eos_token_id=eos,
        pad_token_id=eos,
        projection_dim=projection_dim or shape["hidden_size"],
        **shape,
    )


def build_tiny_models(seed: int = 0, vae_seed: int | None = None) -> TinySDXL:
    """Instantiate the four tiny models with weights drawn from ``seed`` (deterministic)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    text_encoder1 = CLIPTextModel(_text_config(TINY_TE1, "quick_gelu"))
    text_encoder2 = CLIPTextModelWithProjection(_text_config(TINY_TE2, "gelu"))
    torch.manual_seed(seed if vae_seed is None else vae_seed)
    vae = AutoencoderKL(**TINY_VAE)
    # Random init leaves many outputs near zero; give the weights some spread so that tests of
    # conversions and training see non-trivial numbers everywhere.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in (unet, text_encoder1, text_encoder2):
            for name, param in module.named_parameters():
                if name.endswith("bias"):
                    param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    for module in (unet, vae, text_encoder1, text_encoder2):
        module.eval()
    return TinySDXL(unet, vae, text_encoder1, text_encoder2)


def tokenizer_folder_names() -> tuple[str, str]:
    """kohya's ``--tokenizer_cache_dir`` sub-folder names (hub id with ``/`` replaced by ``_``)."""
    return tuple(repo.replace("/", "_") for repo in TOKENIZER_IDS)  # type: ignore[return-value]


def write_tokenizers(folder: Path) -> tuple[Path, Path]:
    """Write both tokenizers in kohya's tokenizer cache layout under ``folder``."""
    name1, name2 = tokenizer_folder_names()
    first = write_tokenizer_files(folder / name1)
    second = write_tokenizer_files(folder / name2, pad_token="!")
    return first, second


def make_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny SDXL in every form the toolkit reads; return the paths written.

    ``tiny-sdxl.safetensors`` (single file, SGM layout), ``diffusers/`` (pipeline folder),
    ``tokenizers/`` (kohya's tokenizer cache layout), ``vae-fix.safetensors`` (a differently seeded
    VAE as a VAE-only single file, like the published fixed SDXL VAEs).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from library.sdxl_model_util import SDXLModels, save_sdxl_checkpoint, save_vae_checkpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok1_dir, tok2_dir = write_tokenizers(out / "tokenizers")
    models = build_tiny_models(seed)
    tokenizer1 = CLIPTokenizer.from_pretrained(str(tok1_dir), model_max_length=77)
    tokenizer2 = CLIPTokenizer.from_pretrained(str(tok2_dir), model_max_length=77)
    bundle = SDXLModels(
        unet=models.unet,
        vae=models.vae,
        text_encoder1=models.text_encoder1,
        text_encoder2=models.text_encoder2,
        tokenizer1=tokenizer1,
        tokenizer2=tokenizer2,
        scheduler_config=dict(SDXL_SCHEDULER_CONFIG),
    )
    single = out / "tiny-sdxl.safetensors"
    save_sdxl_checkpoint(single, bundle, save_precision="float", title="tiny-sdxl", resolution=128)

    pipe = StableDiffusionXLPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder1,
        text_encoder_2=models.text_encoder2,
        tokenizer=tokenizer1,
        tokenizer_2=tokenizer2,
        unet=models.unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
    )
    pipe.save_pretrained(str(out / "diffusers"))

    fixed_vae = build_tiny_models(seed, vae_seed=seed + 1000).vae
    vae_file = out / "vae-fix.safetensors"
    save_vae_checkpoint(vae_file, fixed_vae, save_precision="float")
    return {
        "single_file": single,
        "diffusers": out / "diffusers",
        "tokenizers": out / "tokenizers",
        "vae_fix": vae_file,
    }
