"""``sdxl_train.py ... --estimate_memory``: "will this fit?" answered before anything is loaded.

The models are built on the meta device from the checkpoint's configs (read from the file header
or the diffusers folder's config.json files: no weight is read), so the estimate costs seconds even
for the full-size SDXL. Parts:

- weights: every model in the dtype the run keeps it in (trained UNet in float32, or bf16/fp16 with
  --full_bf16/--full_fp16; frozen parts in the mixed-precision dtype unless --no_half_vae);
- gradients: one per trained weight (with --fused_backward_pass: only the largest tensor's, with
  --fused_optimizer_groups N the largest group's);
- optimizer state: from the optimizer's own rules (AdamW two moments, 8-bit moments one byte each,
  Adafactor's factored row/column statistics in float32, ...);
- activations: the tensors the UNet's forward saves for backward, each counted once, by running that
  forward on the meta device for the run's batch and latent size, weights excluded; attention as the
  fused kernels keep it (no L x L probabilities); with gradient checkpointing, the blocks' inputs plus
  the largest block recomputed during backward;
- EMA: a float32 copy of the trained weights (on the CPU with --ema_device cpu, listed apart).

Not counted: the CUDA context and allocator slack (typically 0.5-1.5 GB on a GPU), temporary buffers
inside one kernel or one optimizer step, the gradients of activations during backward, and data-loader
workers. Checked against measured peak RSS: tests/test_memory_estimate.py (tiny UNet on the CPU) and
benchmarks/train_step.py (full-size UNet, bf16, fused Adafactor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

GB = 1024**3


@dataclass
class MemoryEstimate:
    parts: dict[str, int] = field(default_factory=dict)  # name -> bytes on the training device
    cpu_parts: dict[str, int] = field(default_factory=dict)  # name -> bytes kept in CPU RAM
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def lines(self) -> list[str]:
        out = [f"  {name:18s} {value / GB:8.2f} GiB" for name, value in self.parts.items()]
        out.append(f"  {'total':18s} {self.total / GB:8.2f} GiB (training device)")
        out += [f"  {name:18s} {value / GB:8.2f} GiB (CPU RAM)" for name, value in self.cpu_parts.items()]
        out += [f"  note: {note}" for note in self.notes]
        return out


def read_configs(model: str) -> dict[str, dict]:
    """The four model configs of a single file (header only) or a diffusers folder."""
    from library.errors import ModelError
    from library.sdxl_configs import configs_from_metadata, infer_sdxl_configs

    path = Path(model)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        return configs_from_metadata(metadata) or infer_sdxl_configs(shapes)
    if path.is_dir():
        def load(sub: str) -> dict:
            return json.loads((path / sub / "config.json").read_text(encoding="utf-8"))

        return {"unet": load("unet"), "vae": load("vae"), "te1": load("text_encoder"), "te2": load("text_encoder_2")}
    raise ModelError("--estimate_memory needs a local single file or diffusers folder", where=model)


def _bytes(module, dtype) -> int:
    import torch

    size = torch.empty(0, dtype=dtype).element_size()
    return sum(p.numel() for p in module.parameters()) * size


def optimizer_state_bytes(name: str | None, params: list, args: dict | None = None) -> tuple[int, str | None]:
    """Bytes of optimizer state for ``params`` (tensors or meta tensors); a note when approximate."""
    args = args or {}
    key = (name or "AdamW").lower().split(".")[-1]
    numel = sum(p.numel() for p in params)
    own = sum(p.numel() * p.element_size() for p in params)
    if key in ("adamw", "adam"):
        return 2 * own, None
    if key in ("adamw8bit", "pagedadamw8bit", "adam8bit"):
        return 2 * numel, None
    if key in ("lion8bit", "pagedlion8bit", "sgdnesterov8bit"):
        return numel, None
    if key in ("lion", "sgdnesterov", "sgd"):
        return own, None
    if key == "adafactor":
        total = 0
        for p in params:
            if p.dim() >= 2:
                rows = p.numel() // p.shape[-1]
                cols = p.numel() // p.shape[-2]
                total += (rows + cols) * 4
            else:
                total += p.numel() * 4
            if args.get("beta1") is not None:
                total += p.numel() * 4
        return total, None
    return 2 * own, f"optimizer state of {name} estimated as two moments per weight"


def _fused_attention():
    """F.scaled_dot_product_attention as the fused kernels behave for memory (flash/efficient on GPUs,
    flash on CPUs): the output, and for backward q, k, v, the output and one float32 log-sum-exp per
    query row; never the L x L probabilities that the math kernel (the meta device's) keeps."""
    import torch

    class FusedAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
            lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):  # never run: the meta forward only counts
            raise NotImplementedError

    def attention(query, key, value, *args, **kwargs):
        return FusedAttention.apply(query, key, value)

    return attention


def activation_bytes(unet, batch: int, latent_hw: tuple[int, int], context_len: int, dtype, device="meta") -> int:
    """Peak bytes of the tensors the UNet's forward keeps for backward (weights excluded), each tensor
    counted once: on the meta device for an estimate, or on a real device to check that estimate.

    On the meta device attention is counted as the fused kernels keep it (see ``_fused_attention``).
    With gradient checkpointing the forward keeps only the inputs of each checkpointed block, and the
    backward recomputes one block at a time: the peak is the kept inputs plus the largest block's own
    activations (counted in a second, unchecked pass)."""
    import torch

    params = {id(p) for p in unet.parameters()}
    config = unet.config
    meta = {"device": device, "dtype": dtype}
    sample = torch.empty(batch, config.in_channels, *latent_hw, **meta)
    context = torch.empty(batch, context_len, config.cross_attention_dim, **meta)
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    cond = {"text_embeds": torch.empty(batch, pooled_dim, **meta), "time_ids": torch.empty(batch, 6, **meta)}

    def count(per_block: dict | None = None) -> int:
        seen: set[int] = set()
        total = [0]

        def pack(tensor):
            base = tensor if tensor._base is None else tensor._base
            if id(base) not in params and id(tensor) not in params and id(base) not in seen:
                seen.add(id(base))
                size = base.numel() * base.element_size()
                total[0] += size
                for name in per_block or ():
                    per_block[name][1] += size  # noqa: B023
            return tensor

        handles = []
        if per_block is not None:  # every block that gradient checkpointing would wrap
            for module in unet.modules():
                if type(module).__name__ in ("ResnetBlock2D", "BasicTransformerBlock"):
                    key = id(module)

                    def enter(mod, args, key=key):
                        per_block[key] = [mod, 0]

                    def leave(mod, args, out, key=key):
                        finished[key] = per_block.pop(key)[1]

                    handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        finished: dict[int, int] = {}
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                unet(sample, torch.zeros(batch, dtype=torch.long, device=device), encoder_hidden_states=context,
                     added_cond_kwargs=cond)  # fmt: skip
        finally:
            for handle in handles:
                handle.remove()
        return total[0] if per_block is None else max(finished.values(), default=0)

    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    if str(device) == "meta":
        F.scaled_dot_product_attention = _fused_attention()
    try:
        kept = count()
        if not getattr(unet, "is_gradient_checkpointing", False):
            return kept
        unet.disable_gradient_checkpointing()
        try:
            largest_block = count(per_block={})
        finally:
            unet.enable_gradient_checkpointing()
        return kept + largest_block
    finally:
        F.scaled_dot_product_attention = original


def training_step_parts(unet, trained: list, optimizer_type: str | None, optimizer_args: dict, *,
                        fused_backward: bool, gradient_checkpointing: bool, batch: int,
                        latent_hw: tuple[int, int], context_len: int, compute_dtype,
                        fused_groups: int | None = None) -> MemoryEstimate:
    """Gradients, optimizer state and activations of one training step of ``unet`` (a meta-device
    model in its training dtype; ``trained`` = every trained parameter, UNet's included)."""
    from library.optimizers import split_in_groups

    est = MemoryEstimate()
    grads = sum(p.numel() * p.element_size() for p in trained)
    if fused_backward:  # one tensor's gradient at a time, or one group's (--fused_optimizer_groups)
        units = split_in_groups(trained, fused_groups) if fused_groups else [[p] for p in trained]
        grads = max(sum(p.numel() * p.element_size() for p in unit) for unit in units)
    est.parts["gradients"] = grads
    state, note = optimizer_state_bytes(optimizer_type, trained, optimizer_args)
    est.parts["optimizer state"] = state
    if note:
        est.notes.append(note)
    unet = unet.to(compute_dtype)  # meta tensors: free
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    est.parts["activations"] = activation_bytes(unet, batch, latent_hw, context_len, compute_dtype)
    return est


def estimate_memory(cfg, dataset_cfg) -> MemoryEstimate:
    import torch

    from library.optimizers import parse_optimizer_args
    from library.sdxl_model_util import _build_empty
    from library.train_setup import vae_dtype, weight_dtype

    import logging

    configs = read_configs(cfg.pretrained_model_name_or_path)
    models = {name: _build_empty(name, configs[name]) for name in ("unet", "vae", "te1", "te2")}
    # casting meta modules makes diffusers warn about float32 modules: irrelevant without weights
    logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)
    frozen = weight_dtype(cfg)
    unet_dtype = torch.bfloat16 if cfg.full_bf16 else torch.float16 if cfg.full_fp16 else torch.float32
    te_dtype = torch.float32 if cfg.train_text_encoder else frozen
    unet = models["unet"].to(unet_dtype)
    est = MemoryEstimate()
    est.parts["weights"] = (_bytes(unet, unet_dtype) + _bytes(models["vae"], vae_dtype(cfg))
                            + _bytes(models["te1"], te_dtype) + _bytes(models["te2"], te_dtype))  # fmt: skip
    trained = list(unet.parameters())
    if cfg.train_text_encoder:
        for te, rate in ((models["te1"].to(te_dtype), cfg.learning_rate_te1), (models["te2"].to(te_dtype), cfg.learning_rate_te2)):
            if rate is None or rate > 0:
                trained += list(te.parameters())
    dataset = dataset_cfg.datasets[0]
    width, height = dataset.resolution
    chunks = ((cfg.max_token_length or 75) // 75) * 75 + 2
    ema = sum(p.numel() for p in unet.parameters()) * 4
    compute = frozen if cfg.mixed_precision not in (None, "no") else unet_dtype  # autocast's dtype
    step = training_step_parts(
        unet, trained, cfg.optimizer_type, parse_optimizer_args(cfg.optimizer_args or []),
        fused_backward=cfg.fused_backward_pass, gradient_checkpointing=cfg.gradient_checkpointing,
        batch=dataset.batch_size, latent_hw=(height // 8, width // 8), context_len=chunks, compute_dtype=compute,
        fused_groups=cfg.fused_optimizer_groups or None,
    )  # fmt: skip
    est.notes += step.notes
    est.parts.update(step.parts)
    if cfg.ema:
        (est.cpu_parts if cfg.ema_device == "cpu" else est.parts)["EMA"] = ema
    est.notes.append(f"batch {dataset.batch_size} at {width}x{height}; not counted: CUDA context/allocator slack")
    return est
