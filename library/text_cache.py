"""Cached text-encoder outputs (``--cache_text_encoder_outputs`` and ``..._to_disk``).

An entry is keyed by the caption text, ``--max_token_length`` and the fingerprints of both text
encoders, so editing a caption or changing the encoders never reuses a stale entry. On disk each
entry is one small ``.safetensors`` file in ``CACHE_DIR/te_cache/`` named by that key, written
atomically. Options that make caching meaningless (caption shuffling, dropout, wildcards, training
the text encoders) are rejected when the config is parsed (see ``library.train_args``).
"""

from __future__ import annotations

from pathlib import Path

from library.fingerprint import module_fingerprint, text_fingerprint
from library.text_encoding import TextConditioning, encode_captions


class TextEncoderCache:
    """Maps captions to (context, pooled); fills itself on demand in batches."""

    def __init__(self, models, max_token_length: int, folder: Path | None = None):
        self.models = models
        self.max_token_length = max_token_length
        self.folder = Path(folder) / "te_cache" if folder is not None else None
        self.encoders_key = module_fingerprint(models.text_encoder1) + module_fingerprint(models.text_encoder2)
        self.memory: dict[str, tuple] = {}
        self.encoded = 0  # how many captions were actually run through the encoders

    def key(self, caption: str) -> str:
        return text_fingerprint(caption, self.max_token_length, self.encoders_key)

    def _disk_path(self, key: str) -> Path | None:
        return self.folder / f"{key}.safetensors" if self.folder is not None else None

    def _read_disk(self, key: str):
        from safetensors.torch import load_file

        path = self._disk_path(key)
        if path is None or not path.is_file():
            return None
        data = load_file(str(path))
        return data["context"], data["pooled"]

    def _write_disk(self, key: str, context, pooled) -> None:
        from safetensors.torch import save_file

        from library.fileio import atomic_path

        path = self._disk_path(key)
        if path is None:
            return
        with atomic_path(path) as tmp:
            save_file({"context": context.contiguous(), "pooled": pooled.contiguous()}, str(tmp))

    def fill(self, captions: list[str], batch_size: int = 8) -> None:
        """Make sure every caption has an entry; encode the missing ones in batches."""
        import torch

        missing = []
        for caption in dict.fromkeys(captions):
            key = self.key(caption)
            if key in self.memory:
                continue
            found = self._read_disk(key)
            if found is not None:
                self.memory[key] = found
            else:
                missing.append(caption)
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            with torch.no_grad():
                out = encode_captions(self.models, chunk, self.max_token_length)
            for index, caption in enumerate(chunk):
                context = out.context[index].detach().to("cpu").clone()
                pooled = out.pooled[index].detach().to("cpu").clone()
                key = self.key(caption)
                self.memory[key] = (context, pooled)
                self._write_disk(key, context, pooled)
            self.encoded += len(chunk)

    def get(self, captions: list[str]) -> TextConditioning:
        """Stacked conditioning for ``captions`` (encoding any that are not cached yet)."""
        import torch

        self.fill(captions)
        entries = [self.memory[self.key(c)] for c in captions]
        return TextConditioning(
            context=torch.stack([e[0] for e in entries]),
            pooled=torch.stack([e[1] for e in entries]),
        )
