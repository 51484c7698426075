"""sdxl_train.py's options: kohya's flag names and defaults, a TOML ``--config_file``, one frozen config.

``parse_args(argv)`` returns a :class:`TrainConfig` (a frozen dataclass with one field per flag,
built once; nothing changes it later), or None after ``--output_config`` wrote the config file.

- ``--config_file x.toml``: kohya's format, every table (``[model_arguments]``, ``[optimizer_arguments]``,
  any name) flattened into flags; keys may also sit at the top level. Flags on the command line win.
  Unknown keys, wrong value types and TOML syntax errors are a :class:`ConfigError` naming the file,
  the key or line/column, and the fix ("did you mean ...").
- ``--output_config --config_file out.toml``: write the options that differ from the defaults to
  ``out.toml`` (atomically, never over an existing file) and stop, as kohya does.
- Combinations are checked once here (``--full_bf16`` needs ``--mixed_precision bf16``, cached text
  encoder outputs exclude caption shuffling/dropout and text encoder training, 23 ``--block_lr``
  values, positive counts, ...).

The options themselves are a table (``SECTIONS``): one row per flag, read by the parser, the TOML
reader/writer and the dataclass alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from library.config_util import toml_value
from library.errors import ConfigError
from library.fileio import atomic_write_text
from library.optimizers import parse_key_values

@dataclass(frozen=True)
class Option:
    name: str
    kind: str
    default: Any
    help: str
    choices: tuple = ()


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    options: tuple[Option, ...]


def flag(name: str, help: str) -> Option:
    return Option(name, "flag", False, help)


def opt(name: str, kind: str, default: Any, help: str, choices: tuple = ()) -> Option:
    return Option(name, kind, default, help, choices)


MODEL = Section("model_arguments", "model", (
    opt("pretrained_model_name_or_path", "str", None,
        "the SDXL model to fine-tune: a .safetensors single file or a diffusers folder (required)"),
    opt("vae", "str", None, "replace the model's VAE with this one (file or folder), e.g. the fp16-fix VAE"),
    opt("tokenizer_cache_dir", "str", None, "folder with the two CLIP tokenizers (for offline use)"),
    flag("v_parameterization", "train with the v-prediction target instead of noise (epsilon)"),
    flag("no_half_vae", "keep the VAE in float32 under mixed precision (avoids NaN latents with the original SDXL VAE)"),
    flag("estimate_memory", "print the expected peak memory (weights, gradients, optimizer state, activations) and stop"),
    flag("lowram", "accepted for kohya compatibility; models are always loaded tensor by tensor without a second copy"),
))  # fmt: skip

DATASET = Section("dataset_arguments", "data", (
    opt("dataset_config", "str", None, "dataset TOML (kohya's schema); overrides the data flags below"),
    opt("train_data_dir", "str", None, "folder of training images (kohya's 10_name/ layout, or a plain folder)"),
    opt("in_json", "str", None, "metadata JSON with captions/tags (finetune/merge_*_to_metadata.py)"),
    opt("resolution", "reso", None, "training size: 1024 or width,height such as 832,1216"),
    opt("train_batch_size", "int", 1, "images per step on each process"),
    flag("enable_bucket", "group images of similar aspect ratio into size buckets instead of square crops"),
    opt("min_bucket_reso", "int", 256, "smallest bucket side in pixels"),
    opt("max_bucket_reso", "int", 1024, "largest bucket side in pixels"),
    opt("bucket_reso_steps", "int", 64, "bucket sides are multiples of this (64 recommended for SDXL)"),
    flag("bucket_no_upscale", "never upscale an image to fit a bucket"),
    opt("caption_extension", "str", ".caption", "caption file extension next to each image"),
    flag("shuffle_caption", "shuffle the comma-separated tags of each caption every epoch"),
    opt("keep_tokens", "int", 0, "keep the first N tags in place when shuffling"),
    opt("caption_dropout_rate", "float", 0.0, "probability of training an image with an empty caption"),
    opt("caption_dropout_every_n_epochs", "int", 0, "drop all captions every N epochs (0 = never)"),
    opt("caption_tag_dropout_rate", "float", 0.0, "probability of dropping each tag"),
    flag("flip_aug", "random horizontal flips (do not use for posters with text)"),
    flag("random_crop", "random crops instead of centre crops"),
    flag("color_aug", "random hue rotations (up to 16 degrees) or gamma changes on a third of the images (not with cached latents)"),
    opt("max_token_length", "int", None, "caption length in tokens: 75 (default), 150 or 225", (75, 150, 225)),
    flag("cache_latents", "encode every image with the VAE once before training (in memory)"),
    flag("cache_latents_to_disk", "cache latents in .npz/.safetensors files next to the images (implies --cache_latents)"),
    opt("vae_batch_size", "int", 1, "images per VAE batch while caching latents"),
    flag("skip_cache_check", "trust existing latent cache files without checking them"),
    flag("strict", "stop at the first unreadable image instead of skipping it (skipped images are counted and "
         "listed in the log)"),
    flag("cache_text_encoder_outputs", "encode every caption once before training (text encoders frozen)"),
    flag("cache_text_encoder_outputs_to_disk", "cache text encoder outputs on disk (implies --cache_text_encoder_outputs)"),
    opt("max_data_loader_n_workers", "int", 8, "data loader worker processes (0 = load in the main process)"),
    flag("persistent_data_loader_workers", "keep data loader workers alive between epochs"),
    opt("seed", "int", 42, "random seed for noise, shuffling and sampling (kohya picks a random one; a fixed "
        "default keeps every process in step and makes runs repeatable)"),
))  # fmt: skip

PRECISION = Section("precision_arguments", "precision and memory", (
    opt("mixed_precision", "str", "no", "compute precision", ("no", "fp16", "bf16")),
    flag("full_bf16", "keep the trained weights and gradients in bf16 (needs --mixed_precision bf16)"),
    flag("full_fp16", "keep the trained weights and gradients in fp16 (needs --mixed_precision fp16)"),
    opt("save_precision", "str", None, "precision of saved models (default: float)", ("float", "fp16", "bf16")),
    flag("gradient_checkpointing", "recompute activations in backward: much less memory, ~20-30% slower"),
    opt("gradient_accumulation_steps", "int", 1, "batches summed before each optimizer step"),
    flag("sdpa", "use PyTorch's scaled-dot-product attention (the default)"),
    flag("xformers", "use xformers attention (CUDA only)"),
))  # fmt: skip

TRAINED = Section("training_arguments", "what is trained and how long", (
    flag("train_text_encoder", "also train both text encoders (rates: --learning_rate_te1/--learning_rate_te2)"),
    opt("learning_rate", "float", 2e-6, "learning rate of the UNet (and of the text encoders unless set)"),
    opt("learning_rate_te1", "float", None, "learning rate of text encoder 1 (CLIP ViT-L); 0 freezes it"),
    opt("learning_rate_te2", "float", None, "learning rate of text encoder 2 (OpenCLIP bigG); 0 freezes it"),
    opt("block_lr", "floats", None, "23 comma-separated UNet learning rates in kohya's block order (0 freezes a block)"),
    opt("max_train_steps", "int", 1600, "number of optimizer steps"),
    opt("max_train_epochs", "int", None, "number of epochs (overrides --max_train_steps)"),
))  # fmt: skip

NOISE = Section("noise_arguments", "noise and loss", (
    opt("noise_offset", "float", None, "add this much per-channel constant noise (e.g. 0.0357) for darker/brighter images"),
    flag("noise_offset_random_strength", "use a random noise offset between 0 and --noise_offset"),
    opt("adaptive_noise_scale", "float", None, "grow the noise offset with each channel's mean |latent| (needs --noise_offset)"),
    opt("multires_noise_iterations", "int", None, "levels of multi-resolution (pyramid) noise, e.g. 6-10"),
    opt("multires_noise_discount", "float", 0.3, "weight decay per pyramid level"),
    opt("ip_noise_gamma", "float", None, "input perturbation: extra noise in the noisy latents only (e.g. 0.1)"),
    flag("ip_noise_gamma_random_strength", "use a random input perturbation between 0 and --ip_noise_gamma"),
    opt("min_timestep", "int", None, "smallest training timestep (0-999, default 0)"),
    opt("max_timestep", "int", None, "largest training timestep + 1 (1-1000, default 1000)"),
    opt("min_snr_gamma", "float", None, "min-SNR loss weighting gamma (5 recommended)"),
    flag("scale_v_pred_loss_like_noise_pred", "scale the v-prediction loss like the noise-prediction loss"),
    flag("debiased_estimation_loss", "weight the loss by 1/sqrt(SNR) (debiased estimation)"),
    flag("zero_terminal_snr", "rescale the noise schedule to zero SNR at the last timestep (with v-prediction)"),
    opt("loss_type", "str", "l2", "loss function", ("l2", "l1", "huber", "smooth_l1")),
    opt("huber_c", "float", 0.1, "huber/smooth_l1 threshold parameter (0 < c <= 1)"),
    opt("huber_scale", "float", 1.0, "huber threshold scale (constant and exponential schedules)"),
    opt("huber_schedule", "str", "snr", "how the huber threshold changes with the timestep", ("constant", "exponential", "snr")),
))  # fmt: skip

OPTIMIZER = Section("optimizer_arguments", "optimizer and learning-rate schedule", (
    opt("optimizer_type", "str", "", "AdamW (default), AdamW8bit, Lion, Lion8bit, SGDNesterov, AdaFactor, Prodigy, "
        "DAdaptAdam, ..., any torch.optim name or module.Class"),
    opt("optimizer_args", "list", None, "optimizer options as key=value words, e.g. weight_decay=0.01 betas=0.9,0.999"),
    flag("use_8bit_adam", "old spelling of --optimizer_type AdamW8bit"),
    flag("use_lion_optimizer", "old spelling of --optimizer_type Lion"),
    opt("max_grad_norm", "float", 1.0, "clip the gradient norm to this (0 = no clipping)"),
    flag("ema", "keep an exponential moving average of the trained weights; samples and saves use it"),
    opt("ema_decay", "float", 0.9999, "EMA decay per update"),
    opt("ema_update_every", "int", 1, "update the EMA every N optimizer steps"),
    opt("ema_device", "str", "cpu", "where the EMA lives: cpu (no GPU memory) or same (next to the weights)", ("cpu", "same")),
    flag("no_sample_with_ema", "sample with the raw weights even when --ema is on"),
    flag("save_raw_with_ema", "with --ema, also save the raw weights as NAME-raw..."),
    flag("fused_backward_pass", "step each parameter during backward and free its gradient (saves memory)"),
    opt("fused_optimizer_groups", "int", 0, "kohya's fused optimizer groups: the trained weights in N groups of "
        "about equal size, each stepped during backward once its gradients exist (implies --fused_backward_pass)"),
    opt("fused_backward_clip", "str", "per_tensor", "how --fused_backward_pass applies --max_grad_norm: per_tensor "
        "(kohya's: each gradient on its own) or global (the unfused step's global norm, by one more backward pass)",
        ("per_tensor", "global")),
    opt("lr_scheduler", "str", "constant", "learning-rate schedule",
        ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup", "adafactor")),
    opt("lr_warmup_steps", "steps", 0, "warm-up: steps, or a ratio of the run below 1 (0.05) or a percentage (5%%)"),
    opt("lr_scheduler_num_cycles", "int", 1, "restarts for cosine_with_restarts"),
    opt("lr_scheduler_power", "float", 1.0, "power of the polynomial schedule"),
    opt("lr_scheduler_type", "str", "", "any torch.optim.lr_scheduler class (e.g. StepLR) or module.Class"),
    opt("lr_scheduler_args", "list", None, "options of --lr_scheduler_type as key=value words, e.g. step_size=100"),
))  # fmt: skip

SAMPLING = Section("sample_prompt_arguments", "sample images during training", (
    opt("sample_every_n_steps", "int", None, "generate samples every N steps"),
    opt("sample_score_clip_model", "str", None,
        "score each sample with this CLIP (hub id or folder, e.g. openai/clip-vit-large-patch14) and log it"),
    opt("sample_score_aesthetic_model", "str", None,
        "score each sample with the LAION aesthetic predictor (.pth/.safetensors; needs --sample_score_clip_model)"),
    opt("validate_every_n_steps", "int", None,
        "every N steps, log the deterministic loss on the held-out images (validation_split in the dataset TOML)"),
    opt("validation_timesteps", "str", "100,300,500,700,900", "fixed timesteps of the validation loss (comma separated)"),
    opt("sample_every_n_epochs", "int", None, "generate samples every N epochs"),
    flag("sample_at_first", "generate samples before the first step"),
    opt("sample_prompts", "str", None, "prompt file (.txt with kohya's --n/--w/--h/--d/--s/--l options, .toml or .json)"),
    opt("sample_sampler", "str", None, "sampler for samples: euler_a (default), euler, ddim, dpmsolver++, ..."),
))  # fmt: skip

SAVING = Section("saving_arguments", "saving and resuming", (
    opt("output_dir", "str", None, "folder for models, states and samples (required)"),
    opt("output_name", "str", "last", "base name of saved files (NAME-step00000100.safetensors, NAME.safetensors)"),
    opt("save_model_as", "str", "safetensors", "model format", ("safetensors", "diffusers", "diffusers_safetensors")),
    opt("save_every_n_steps", "int", None, "save the model every N steps"),
    opt("save_every_n_epochs", "int", None, "save the model every N epochs"),
    opt("save_last_n_steps", "int", None, "keep only the step saves of the last N steps"),
    opt("save_last_n_epochs", "int", None, "keep only the last N epoch saves"),
    opt("save_last_n_steps_state", "int", None, "keep only the state folders of the last N steps"),
    opt("save_last_n_epochs_state", "int", None, "keep only the last N epoch state folders"),
    flag("save_state", "also save the full training state (optimizer, RNG, position) with each save"),
    flag("save_state_on_train_end", "save the training state at the end of the run"),
    flag("save_state_on_interrupt", "on Ctrl+C or SIGTERM, save a resumable state before exiting (the default)"),
    flag("no_save_state_on_interrupt", "on Ctrl+C or SIGTERM, exit without saving a state"),
    opt("resume", "str", None, "continue from this state folder (NAME-step00000100-state)"),
))  # fmt: skip

LOGGING = Section("logging_arguments", "logging", (
    opt("logging_dir", "str", None, "folder for TensorBoard/W&B logs"),
    opt("log_with", "str", None, "logger (default tensorboard when --logging_dir is set)", ("tensorboard", "wandb", "all")),
    opt("log_prefix", "str", None, "prefix of the run's log folder name"),
    opt("log_tracker_name", "str", None, "tracker (project) name"),
))  # fmt: skip

SECTIONS: tuple[Section, ...] = (MODEL, DATASET, PRECISION, TRAINED, NOISE, OPTIMIZER, SAMPLING, SAVING, LOGGING)
OPTIONS: dict[str, Option] = {o.name: o for s in SECTIONS for o in s.options}
SECTION_OF: dict[str, str] = {o.name: s.name for s in SECTIONS for o in s.options}


# ------------------------------------------------------------------------------- the dataclass

_PY_TYPES = {"flag": bool, "int": "int | None", "float": "float | None", "str": "str | None",
             "list": "tuple[str, ...] | None", "steps": "int | float", "reso": "str | None",
             "floats": "tuple[float, ...] | None"}  # fmt: skip

TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [(o.name, _PY_TYPES[o.kind], dataclasses.field(default=o.default)) for o in OPTIONS.values()]
    + [("config_file", "str | None", dataclasses.field(default=None))],
    frozen=True,
)
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = "Every sdxl_train.py option, parsed and checked once (kohya's names; see SECTIONS)."


# ---------------------------------------------------------------------------------- the parser


def _int_or_ratio(text: str) -> int | float:
    """kohya's ``--lr_warmup_steps``: ``100`` steps, ``0.05`` or ``5%`` of the run."""
    text = str(text).strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of steps or a ratio") from None
    return int(value) if value >= 1 and value.is_integer() else value


_METAVARS = {"int": "N", "float": "X", "str": "TEXT", "steps": "N|RATIO", "reso": "W[,H]", "floats": "LR,LR,..."}
_ARGPARSE_TYPES = {"int": int, "float": float, "str": str, "steps": _int_or_ratio, "reso": str, "floats": str}


def _help(o: Option) -> str:
    shown = o.default not in (None, False, "", 0.0) or o.kind in ("int", "float") and o.default is not None
    return f"{o.help} (default: {o.default})" if shown and o.kind != "flag" else o.help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdxl_train.py",
        usage="%(prog)s [--config_file FILE.toml] [options]",
        description="Full fine-tuning of Stable Diffusion XL with kohya sd-scripts' flags.",
        epilog="example: accelerate launch sdxl_train.py --config_file train.toml --max_train_steps 2000\n"
        "(a kohya sdxl_train.py command line or TOML runs unchanged)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    group = parser.add_argument_group("config file")
    group.add_argument("--config_file", metavar="FILE.toml", help="read options from this TOML (flags given here win over it)")
    group.add_argument("--output_config", action="store_true", help="write the options given to --config_file and stop")
    for section in SECTIONS:
        group = parser.add_argument_group(section.title)
        for o in section.options:
            kwargs: dict[str, Any] = {"default": o.default, "help": _help(o)}
            if o.kind == "flag":
                kwargs["action"] = "store_true"
            elif o.kind == "list":
                kwargs.update(nargs="*", metavar="KEY=VALUE")
            else:
                kwargs["type"] = _ARGPARSE_TYPES[o.kind]
                kwargs["metavar"] = _METAVARS[o.kind] if not o.choices else None
            if o.choices:
                kwargs["choices"] = o.choices
            group.add_argument(f"--{o.name}", **kwargs)
    return parser


def _cli_names(argv: Sequence[str]) -> set[str]:
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}


def _did_you_mean(word: str, names) -> str | None:
    close = difflib.get_close_matches(word, list(names), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def parse_args(argv: Sequence[str] | None = None):
    """Parse the command line (and ``--config_file``) into a :class:`TrainConfig`; None after
    ``--output_config`` wrote its file."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        word = next((e for e in extra if e.startswith("--")), extra[0])
        hint = _did_you_mean(word, [f"--{n}" for n in OPTIONS]) or "see sdxl_train.py --help"
        raise ConfigError(f"unknown option '{word}'", where="command line", hint=hint)
    path = _toml_path(args.config_file) if args.config_file else None
    if args.output_config:
        if path is None:
            raise ConfigError("--output_config needs --config_file OUT.toml (where to write)", where="command line")
        write_config(path, _values(args))
        return None
    from_file: dict[str, Any] = {}
    if path is not None:
        from_file = load_config_file(path)
        parser.set_defaults(**from_file)
        args = parser.parse_args(argv)
    values = _values(args)
    source = _Source(path, set(from_file), _cli_names(argv))
    cfg = TrainConfig(config_file=str(path) if path else None, **_normalize(values, source))
    validate(cfg, source)
    return cfg


def _values(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in OPTIONS}


def _toml_path(name: str) -> Path:
    return Path(name if name.endswith(".toml") else name + ".toml")


# ------------------------------------------------------------------------------------ TOML in


_TOML_AT = re.compile(r"^(.*?)\s*\(at line (\d+), column (\d+)\)\s*$", re.S)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """kohya's config TOML as flag values: tables flattened, keys and types checked."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist", where="--config_file") from None
    except UnicodeDecodeError:
        raise ConfigError("not a UTF-8 text file", where=str(path)) from None
    except tomllib.TOMLDecodeError as err:
        found = _TOML_AT.match(str(err))
        where = f"{path}: line {found[2]}, column {found[3]}" if found else str(path)
        raise ConfigError(f"invalid TOML: {found[1] if found else err}", where=where,
                          hint="check the quotes, brackets and '=' there") from None  # fmt: skip
    flat: dict[str, Any] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, item in items:
            where = f"{path}: [{key}] {name}" if isinstance(value, dict) else f"{path}: {name}"
            if name not in OPTIONS:
                hint = _did_you_mean(name, OPTIONS) or "see sdxl_train.py --help for the option names"
                raise ConfigError(f"unknown key '{name}'", where=where, hint=hint)
            if name in flat:
                raise ConfigError(f"'{name}' is set twice", where=where, hint="keep one of them")
            flat[name] = _from_toml(OPTIONS[name], item, where)
    return flat


_EXPECTED = {"flag": "true or false", "int": "an integer", "float": "a number", "str": "a string",
             "list": 'a list of strings such as ["a=1", "b=2"]', "steps": "an integer or a ratio below 1",
             "reso": 'an integer or "width,height"', "floats": "a list of numbers or a comma-separated string"}  # fmt: skip


def _from_toml(o: Option, value: Any, where: str) -> Any:
    def bad():
        return ConfigError(f"'{o.name}' must be {_EXPECTED[o.kind]}, not {type(value).__name__} {value!r}", where=where)

    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if o.kind == "flag" and not isinstance(value, bool):
        raise bad()
    if o.kind == "int" and not (is_number and float(value).is_integer()):
        raise bad()
    if o.kind in ("float", "steps") and not is_number:
        raise bad()
    if o.kind == "str" and not isinstance(value, str):
        raise bad()
    if o.kind == "list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad()
        value = tuple(value)
    if o.kind == "reso":
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
            value = f"{value[0]},{value[1]}"
        elif is_number or isinstance(value, str):
            value = str(value)
        else:
            raise bad()
    if o.kind == "floats" and not (isinstance(value, str) or isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):  # fmt: skip
        raise bad()
    if o.kind == "steps":
        value = _int_or_ratio(str(value))
    value = int(value) if o.kind == "int" else float(value) if o.kind == "float" else value
    if o.choices and value not in o.choices:
        raise ConfigError(f"'{o.name}' must be one of {', '.join(map(str, o.choices))}, not {value!r}", where=where,
                          hint=_did_you_mean(str(value), map(str, o.choices)))  # fmt: skip
    return value


# ----------------------------------------------------------------------------------- TOML out


def config_toml(values: dict[str, Any]) -> str:
    """The options that differ from the defaults, as a kohya config TOML grouped by section."""
    lines: list[str] = []
    for section in SECTIONS:
        rows = [(o.name, values[o.name]) for o in section.options
                if o.name in values and values[o.name] is not None and values[o.name] != o.default]  # fmt: skip
        if rows:
            lines += ([""] if lines else []) + [f"[{section.name}]"]
            lines += [f"{name} = {toml_value(value)}" for name, value in rows]
    return "\n".join(lines) + "\n"


def write_config(path: Path, values: dict[str, Any]) -> None:
    if path.exists():
        raise ConfigError(f"'{path}' already exists; not overwriting it", where="--output_config",
                          hint="choose a new --config_file name or move the old file away")  # fmt: skip
    atomic_write_text(path, config_toml(values))
    print(f"wrote the config to {path}")


# ----------------------------------------------------------------------------- normalization


@dataclass(frozen=True)
class _Source:
    path: Path | None
    from_file: set
    from_cli: set

    def where(self, name: str) -> str:
        if name in self.from_cli or name not in self.from_file:
            return f"command line: --{name}"
        return f"{self.path}: {name}"


def _normalize(values: dict[str, Any], source: _Source) -> dict[str, Any]:
    """Resolve kohya's implied values once: old optimizer flags, cache "to disk" implying the cache,
    lists as tuples, --block_lr as numbers."""
    out = dict(values)
    for name, o in OPTIONS.items():
        if o.kind == "list" and out[name] is not None:
            out[name] = tuple(out[name])
    if not out["optimizer_type"]:
        out["optimizer_type"] = "AdamW8bit" if out["use_8bit_adam"] else "Lion" if out["use_lion_optimizer"] else "AdamW"
    out["cache_latents"] = out["cache_latents"] or out["cache_latents_to_disk"]
    out["cache_text_encoder_outputs"] = out["cache_text_encoder_outputs"] or out["cache_text_encoder_outputs_to_disk"]
    out["fused_backward_pass"] = out["fused_backward_pass"] or bool(out["fused_optimizer_groups"])
    if out["block_lr"] is not None:
        out["block_lr"] = _block_lr(out["block_lr"], source.where("block_lr"))
    return out


def _block_lr(value: Any, where: str) -> tuple[float, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        rates = tuple(float(v) for v in items)
    except ValueError:
        raise ConfigError(f"--block_lr '{value}' is not a list of numbers", where=where) from None
    if len(rates) != 23:
        raise ConfigError(f"--block_lr needs 23 values (SDXL's UNet blocks), got {len(rates)}", where=where,
                          hint="order: embeddings, input blocks 0-8, middle 0-2, output blocks 0-8, out")  # fmt: skip
    if any(r < 0 or math.isnan(r) for r in rates):
        raise ConfigError("--block_lr values must be >= 0", where=where)
    return rates


# -------------------------------------------------------------------------------- validation


def _positive(cfg, where, names: Sequence[str], minimum: float, strict: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None:
            continue
        bad = value <= minimum if strict else value < minimum
        if bad or (isinstance(value, float) and math.isnan(value)):
            need = f"> {minimum:g}" if strict else f">= {minimum:g}"
            raise ConfigError(f"--{name} must be {need} (got {value})", where=where(name))


def _requires(cfg, where, name: str, ok: bool, message: str, hint: str | None = None) -> None:
    if getattr(cfg, name) and not ok:
        raise ConfigError(message, where=where(name), hint=hint)


def validate(cfg, source: _Source) -> None:
    """Combinations and ranges, checked once; a ConfigError names the flag (or file and key)."""
    where = source.where
    for name in ("pretrained_model_name_or_path", "output_dir"):
        if not getattr(cfg, name):
            raise ConfigError(f"--{name} is required", where=where(name))
    _positive(cfg, where, ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "max_train_epochs",
                           "vae_batch_size", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                           "save_every_n_steps", "save_every_n_epochs", "save_last_n_steps", "save_last_n_epochs",
                           "save_last_n_steps_state", "save_last_n_epochs_state", "sample_every_n_steps",
                           "sample_every_n_epochs", "multires_noise_iterations", "lr_scheduler_num_cycles"), 1)  # fmt: skip
    _positive(cfg, where, ("fused_optimizer_groups", "keep_tokens", "max_data_loader_n_workers",
                           "caption_dropout_every_n_epochs", "seed",
                           "learning_rate", "learning_rate_te1", "learning_rate_te2", "max_grad_norm", "noise_offset",
                           "ip_noise_gamma", "caption_dropout_rate", "caption_tag_dropout_rate",
                           "lr_warmup_steps", "min_timestep"), 0)  # fmt: skip
    _positive(cfg, where, ("min_snr_gamma", "huber_c", "huber_scale", "multires_noise_discount", "lr_scheduler_power"), 0,
              strict=True)  # fmt: skip
    _check_output_dir(cfg, where)
    _check_ranges(cfg, where)
    _check_precision(cfg, where)
    _check_text_cache(cfg, where)
    _check_schedule(cfg, where)
    _check_formats(cfg, where)


def _check_output_dir(cfg, where) -> None:
    """A file where --output_dir (or one of its parents) should be: stop now, not after model loading."""
    path = Path(cfg.output_dir)
    for part in (path, *path.parents):
        if not part.exists():
            continue
        if not part.is_dir():
            raise ConfigError(f"--output_dir {cfg.output_dir}: {part} is a file, not a folder", where=where("output_dir"),
                              hint="choose a folder path that no file is in the way of")  # fmt: skip
        if not os.access(part, os.W_OK | os.X_OK):
            raise ConfigError(f"--output_dir {cfg.output_dir}: {part} is not writable", where=where("output_dir"))
        return


def _check_ranges(cfg, where) -> None:
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate", "huber_c"):
        if getattr(cfg, name) > 1:
            raise ConfigError(f"--{name} must be at most 1 (got {getattr(cfg, name)})", where=where(name))
    if cfg.min_bucket_reso > cfg.max_bucket_reso:
        raise ConfigError(f"--min_bucket_reso {cfg.min_bucket_reso} is above --max_bucket_reso {cfg.max_bucket_reso}",
                          where=where("min_bucket_reso"))  # fmt: skip
    low = 0 if cfg.min_timestep is None else cfg.min_timestep
    high = 1000 if cfg.max_timestep is None else cfg.max_timestep
    if not 0 <= low < high <= 1000:
        raise ConfigError(f"timesteps [{low}, {high}) are not within [0, 1000) or empty", where=where("max_timestep"),
                          hint="use 0 <= --min_timestep < --max_timestep <= 1000")  # fmt: skip
    _requires(cfg, where, "adaptive_noise_scale", bool(cfg.noise_offset), "--adaptive_noise_scale needs --noise_offset")
    _requires(cfg, where, "noise_offset_random_strength", bool(cfg.noise_offset),
              "--noise_offset_random_strength needs --noise_offset")  # fmt: skip
    _requires(cfg, where, "ip_noise_gamma_random_strength", bool(cfg.ip_noise_gamma),
              "--ip_noise_gamma_random_strength needs --ip_noise_gamma")  # fmt: skip


def _check_precision(cfg, where) -> None:
    _requires(cfg, where, "full_fp16", cfg.mixed_precision == "fp16", "--full_fp16 needs --mixed_precision fp16")
    _requires(cfg, where, "full_bf16", cfg.mixed_precision == "bf16", "--full_bf16 needs --mixed_precision bf16")
    _requires(cfg, where, "xformers", not cfg.sdpa, "--xformers and --sdpa both given", hint="choose one")
    _requires(cfg, where, "fused_backward_pass", cfg.gradient_accumulation_steps == 1,
              "--fused_backward_pass steps during backward, so it cannot accumulate gradients",
              hint="use --gradient_accumulation_steps 1")  # fmt: skip
    _requires(cfg, where, "fused_backward_pass", cfg.mixed_precision != "fp16",
              "--fused_backward_pass steps inside backward, before fp16's loss scaling could be undone or checked",
              hint="use --mixed_precision bf16 (or no) with --fused_backward_pass")  # fmt: skip
    _requires(cfg, where, "fused_backward_clip", cfg.fused_backward_pass or cfg.fused_backward_clip == "per_tensor",
              "--fused_backward_clip only applies with --fused_backward_pass", hint="add --fused_backward_pass")  # fmt: skip


def _check_text_cache(cfg, where) -> None:
    if not cfg.cache_text_encoder_outputs:
        return
    clashes = [f"--{n}" for n in ("shuffle_caption", "train_text_encoder") if getattr(cfg, n)]
    clashes += [f"--{n}" for n in ("caption_dropout_rate", "caption_tag_dropout_rate", "caption_dropout_every_n_epochs")
                if getattr(cfg, n)]  # fmt: skip
    if clashes:
        raise ConfigError(
            f"--cache_text_encoder_outputs encodes each caption once, which cannot go with {', '.join(clashes)}",
            where=where("cache_text_encoder_outputs"), hint="drop one side",
        )


def _check_schedule(cfg, where) -> None:
    if cfg.lr_scheduler == "adafactor" and cfg.optimizer_type.lower() != "adafactor" and not cfg.lr_scheduler_type:
        raise ConfigError("--lr_scheduler adafactor works only with --optimizer_type AdaFactor",
                          where=where("lr_scheduler"))  # fmt: skip
    warmup = cfg.lr_warmup_steps
    if isinstance(warmup, float) and warmup >= 1 and not warmup.is_integer():
        raise ConfigError(f"--lr_warmup_steps {warmup}: use whole steps, or a ratio below 1 such as 0.05",
                          where=where("lr_warmup_steps"))  # fmt: skip
    if warmup and (cfg.lr_scheduler == "constant" or cfg.lr_scheduler_type) and cfg.lr_scheduler != "adafactor":
        what = f"--lr_scheduler_type {cfg.lr_scheduler_type}" if cfg.lr_scheduler_type else "--lr_scheduler constant"
        raise ConfigError(f"{what} takes no warm-up, but --lr_warmup_steps is {warmup}", where=where("lr_warmup_steps"),
                          hint="use --lr_scheduler constant_with_warmup, or --lr_warmup_steps 0")  # fmt: skip


def _check_formats(cfg, where) -> None:
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", str(cfg.validation_timesteps)) or any(
        int(t) >= 1000 for t in str(cfg.validation_timesteps).split(",")
    ):
        raise ConfigError(f"--validation_timesteps '{cfg.validation_timesteps}' must be integers below 1000, "
                          "comma separated", where=where("validation_timesteps"))  # fmt: skip
    parse_key_values(cfg.optimizer_args, "--optimizer_args")
    parse_key_values(cfg.lr_scheduler_args, "--lr_scheduler_args")
    if cfg.resolution is not None and not re.fullmatch(r"\s*[1-9]\d*\s*(,\s*[1-9]\d*\s*)?", cfg.resolution):
        raise ConfigError(f"--resolution '{cfg.resolution}' is not 1024 or width,height", where=where("resolution"))
    if cfg.resume is not None and not Path(cfg.resume).is_dir():
        raise ConfigError(f"state folder '{cfg.resume}' does not exist", where=where("resume"),
                          hint="pass a NAME-step00000100-state folder saved with --save_state")  # fmt: skip
