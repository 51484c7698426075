"""CLIP score and LAION aesthetic score, batched.

    scorer = Scorer("openai/clip-vit-large-patch14", "sac+logos+ava1-l14-linearMSE.pth", "cuda", 32)
    clip_scores, aesthetic_scores = scorer.score(images, prompts)

CLIP score is the cosine of the L2-normalised image and text embeddings (the seed's definition; text
is truncated to the model's context). With ``clip_score_scale=100`` it is ``100 * max(cos, 0)``, the
torchmetrics convention. The aesthetic score is the LAION MLP on the L2-normalised image embedding.
Each image is encoded once for both scores and each distinct prompt once; :meth:`Scorer.score_files`
loads and preprocesses the next batch in a background thread while the current one is encoded.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from library.errors import ModelError


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_clip(spec: str | Path, device: str = "cpu"):
    """``(CLIPModel, CLIPProcessor)`` from a hub id or a local folder saved by ``save_pretrained``."""
    import os

    from transformers import CLIPModel, CLIPProcessor

    spec = str(spec)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    local = Path(spec).expanduser()
    kwargs: dict[str, Any] = {"local_files_only": offline or local.is_dir()}
    try:
        model = CLIPModel.from_pretrained(str(local) if local.is_dir() else spec, **kwargs)
        processor = CLIPProcessor.from_pretrained(str(local) if local.is_dir() else spec, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ModelError(f"cannot load CLIP model ({first})", where=spec,
                         hint="pass --clip_model with a transformers CLIP id or a local folder") from None
    return model.to(device).eval(), processor


def _pooled(output):
    """transformers 5 returns a model output whose ``pooler_output`` is the projection; older a tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


@dataclass
class FileBatch:
    """One batch from the background loader: preprocessed pixels, their files, and files that failed."""

    paths: list[Path]
    pixel_values: Any
    failed: list[tuple[Path, str]] = field(default_factory=list)


class Scorer:
    """CLIP + aesthetic scorer; models are loaded once and reused for every call.

    ``clip_model`` is a hub id / folder or a ``(CLIPModel, CLIPProcessor)`` pair; ``aesthetic_model``
    a ``.pth``/``.safetensors`` path, an :class:`~library.evaluation.aesthetic.AestheticMLP`, or None
    (aesthetic scores are then NaN).
    """

    def __init__(self, clip_model, aesthetic_model=None, device: str | None = "auto", batch_size: int = 16,
                 clip_score_scale: float | None = None, loader_threads: int | None = None):
        import os

        import torch

        from library.evaluation.aesthetic import load_aesthetic_model

        self.device = resolve_device(device)
        self.batch_size = max(1, int(batch_size))
        self.clip_score_scale = clip_score_scale
        self.loader_threads = loader_threads or max(1, min(4, os.cpu_count() or 1))
        if isinstance(aesthetic_model, (str, Path)):  # first: small, and a bad file fails fast
            aesthetic_model = load_aesthetic_model(aesthetic_model, self.device)
        if isinstance(clip_model, (str, Path)):
            self.clip, self.processor = load_clip(clip_model, self.device)
        else:
            self.clip, self.processor = clip_model
            self.clip = self.clip.to(self.device).eval()
        self.aesthetic = aesthetic_model.to(self.device).eval() if aesthetic_model is not None else None
        embed = int(self.clip.config.projection_dim)
        if self.aesthetic is not None and self.aesthetic.input_size != embed:
            raise ModelError(
                f"the aesthetic MLP takes {self.aesthetic.input_size}-d embeddings but the CLIP model gives {embed}-d",
                hint="the LAION predictor needs CLIP ViT-L/14 (openai/clip-vit-large-patch14)")
        limit = int(self.clip.config.text_config.max_position_embeddings)
        self.max_text_length = min(limit, int(getattr(self.processor.tokenizer, "model_max_length", limit)))
        self._torch = torch

    # -- embeddings -------------------------------------------------------------------------------
    def preprocess(self, images: Sequence) -> Any:
        rgb = [self._pre_resize(image if image.mode == "RGB" else image.convert("RGB")) for image in images]
        return self.processor.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    def _pre_resize(self, image):
        """Do the PIL image processor's shortest-edge resize on the PIL image itself.

        The PIL backend converts the full-size image to numpy and back to PIL to resize it; resizing
        first with the same size and filter gives the same pixels (its own resize is then a copy) and
        skips two full-size copies. Any other processor configuration is left to the processor.
        """
        processor = self.processor.image_processor
        size = getattr(processor, "size", None)
        target = getattr(size, "shortest_edge", None)
        if (not type(processor).__name__.endswith("Pil") or not getattr(processor, "do_resize", False)
                or not target or getattr(size, "longest_edge", None) or processor.resample is None):
            return image
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(target * long / short)
        new_size = (target, new_long) if width <= height else (new_long, target)
        return image.resize(new_size, resample=int(processor.resample))

    def image_embeddings(self, pixel_values) -> Any:
        """L2-normalised image embeddings ``(N, D)`` for preprocessed pixels."""
        with self._torch.no_grad():
            pixels = pixel_values.to(self.device, dtype=self.clip.dtype)
            features = _pooled(self.clip.get_image_features(pixel_values=pixels)).float()
        return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def text_embeddings(self, prompts: Sequence[str]) -> Any:
        """L2-normalised text embeddings ``(N, D)``; texts longer than the context are truncated."""
        chunks = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.processor.tokenizer(list(prompts[start:start + self.batch_size]), padding=True,
                                              truncation=True, max_length=self.max_text_length,
                                              return_tensors="pt")
            with self._torch.no_grad():
                features = _pooled(self.clip.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device))).float()
            chunks.append(features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return self._torch.cat(chunks) if chunks else self._torch.zeros(0, self.clip.config.projection_dim)

    # -- scores -----------------------------------------------------------------------------------
    def scores_from_embeddings(self, image_emb, text_emb) -> tuple[list[float], list[float]]:
        cosine = (image_emb * text_emb.to(image_emb.device)).sum(dim=-1)
        if self.clip_score_scale is not None:
            cosine = self.clip_score_scale * cosine.clamp_min(0)
        if self.aesthetic is None:
            aesthetic = [float("nan")] * len(cosine)
        else:
            with self._torch.no_grad():
                aesthetic = self.aesthetic(image_emb).squeeze(-1).float().cpu().tolist()
        return cosine.cpu().tolist(), aesthetic

    def _prompt_table(self, prompts: Sequence[str]):
        unique = list(dict.fromkeys(prompts))
        embeddings = self.text_embeddings(unique)
        row = {prompt: index for index, prompt in enumerate(unique)}
        return embeddings, row

    def score(self, images: Sequence, prompts: Sequence[str]) -> tuple[list[float], list[float]]:
        """Scores for PIL images and their prompts (same length): ``(clip_scores, aesthetic_scores)``."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        text_emb, row = self._prompt_table(prompts)
        clip_scores: list[float] = []
        aesthetic_scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            image_emb = self.image_embeddings(self.preprocess(batch))
            rows = [row[p] for p in prompts[start:start + self.batch_size]]
            clip, aesthetic = self.scores_from_embeddings(image_emb, text_emb[rows])
            clip_scores += clip
            aesthetic_scores += aesthetic
        return clip_scores, aesthetic_scores

    def score_files(self, paths: Sequence[Path], prompts: Sequence[str],
                    on_batch: Callable[[int], None] | None = None) -> tuple[dict, list[tuple[Path, str]]]:
        """Score image files; returns ``({path: (clip, aesthetic)}, [(path, reason) unreadable])``.

        Files are opened and preprocessed by ``loader_threads`` threads, in the background and one
        batch ahead of the model; ``on_batch(n)`` is called after each batch (progress bars).
        """
        text_emb, row = self._prompt_table(prompts)
        prompt_of = dict(zip(paths, prompts))
        results: dict[Path, tuple[float, float]] = {}
        failed: list[tuple[Path, str]] = []
        for batch in _background(self._load_batches(paths)):
            failed += batch.failed
            if batch.paths:
                image_emb = self.image_embeddings(batch.pixel_values)
                rows = [row[prompt_of[p]] for p in batch.paths]
                clip, aesthetic = self.scores_from_embeddings(image_emb, text_emb[rows])
                results.update(zip(batch.paths, zip(clip, aesthetic)))
            if on_batch is not None:
                on_batch(len(batch.paths) + len(batch.failed))
        return results, failed

    def _load_one(self, path: Path):
        """Open and preprocess one file: ``(pixel_values (1, 3, H, W), None)`` or ``(None, reason)``."""
        from PIL import Image

        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return None, (str(err).splitlines()[0][:120] if str(err) else type(err).__name__)
        return self.preprocess([rgb]), None

    def _load_batches(self, paths: Sequence[Path]) -> Iterator[FileBatch]:
        """Batches of preprocessed files; decoding and resizing run on a few threads (PIL releases the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.loader_threads, thread_name_prefix="image-decode") as pool:
            for start in range(0, len(paths), self.batch_size):
                chunk = list(paths[start:start + self.batch_size])
                ok, pixels, failed = [], [], []
                for path, (values, reason) in zip(chunk, pool.map(self._load_one, chunk)):
                    if values is None:
                        failed.append((path, reason))
                    else:
                        ok.append(path)
                        pixels.append(values)
                yield FileBatch(ok, self._torch.cat(pixels) if pixels else None, failed)


def _background(items: Iterator, prefetch: int = 2) -> Iterator:
    """Run the iterator ``items`` in a daemon thread, ``prefetch`` items ahead; re-raise its errors here."""
    done = object()
    slots: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put(item)
            slots.put(done)
        except BaseException as err:  # handed to the consumer, which raises it
            slots.put(err)

    worker = threading.Thread(target=produce, name="image-loader", daemon=True)
    worker.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)
