"""tools/convert_sdxl.py, tools/show_metadata.py, tools/make_tiny_sdxl.py and the streaming writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.safetensors_stream import save_file_streaming

REPO = Path(__file__).resolve().parents[1]


def run_tool(*args, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-2000:])
    return proc


def test_streaming_writer_matches_the_official_reader(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=generator),
        "b.int": torch.arange(7, dtype=torch.int64),
        "c": lambda: torch.randn(2, 2, 2, generator=torch.Generator().manual_seed(1)),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "s.safetensors"
    save_file_streaming(tensors, path, metadata={"k": "v"}, cast=lambda t: t.half() if t.is_floating_point() else t)
    loaded = load_file(str(path))
    assert torch.equal(loaded["a"], tensors["a"].half())
    assert torch.equal(loaded["b.int"], tensors["b.int"])
    assert torch.equal(loaded["c"], tensors["c"]().half())
    assert loaded["scalar"].shape == () and loaded["scalar"].item() == 2.5
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"k": "v"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_streaming_writer_bf16(tmp_path):
    tensor = torch.randn(4, 4)
    path = tmp_path / "bf.safetensors"
    save_file_streaming({"w": tensor}, path, cast=lambda t: t.bfloat16())
    assert torch.equal(load_file(str(path))["w"], tensor.bfloat16())


def test_make_tiny_sdxl_is_deterministic_for_a_seed(tmp_path, tiny_sdxl):
    run_tool("tools/make_tiny_sdxl.py", str(tmp_path / "again"), "--seed", "0")
    first = load_file(str(tiny_sdxl["single_file"]))
    second = load_file(str(tmp_path / "again" / "tiny-sdxl.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "again" / "diffusers" / "model_index.json").is_file()
    assert (tmp_path / "again" / "tokenizers" / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k").is_dir()
    other = load_file(str(tmp_path / "again" / "vae-fix.safetensors"))
    assert all(k.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv")) for k in other)


def test_convert_single_to_diffusers_to_single_with_vae_baked_in(tmp_path, tiny_sdxl):
    folder = tmp_path / "pipe"
    run_tool("tools/convert_sdxl.py", str(tiny_sdxl["single_file"]), str(folder),
             "--tokenizer_cache_dir", str(tiny_sdxl["tokenizers"]), "--vae", str(tiny_sdxl["vae_fix"]))
    out = tmp_path / "baked.safetensors"
    proc = run_tool("tools/convert_sdxl.py", str(folder), str(out), "--save_precision", "fp16")
    assert "single file, fp16" in proc.stdout
    baked = load_file(str(out))
    vae = load_file(str(tiny_sdxl["vae_fix"]))
    for key, tensor in vae.items():
        assert torch.equal(baked[f"first_stage_model.{key}"], tensor.half()), key
    original = load_file(str(tiny_sdxl["single_file"]))
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(baked[key], original[key].half())


def test_convert_refuses_to_overwrite(tmp_path, tiny_sdxl):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    proc = run_tool("tools/convert_sdxl.py", str(tiny_sdxl["diffusers"]), str(out), check=False)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_bytes() == b"keep me"


def test_convert_sd1_input_is_one_line_error(tmp_path):
    from safetensors.torch import save_file

    sd1 = tmp_path / "sd1.safetensors"
    save_file({"cond_stage_model.transformer.text_model.x": torch.zeros(1)}, str(sd1))
    proc = run_tool("tools/convert_sdxl.py", str(sd1), str(tmp_path / "o.safetensors"), check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "Stable Diffusion 1.x" in lines[0] and str(sd1) in lines[0]
    assert not (tmp_path / "o.safetensors").exists()


def test_show_metadata_reads_only_the_header(tmp_path, tiny_sdxl):
    proc = run_tool("tools/show_metadata.py", str(tiny_sdxl["single_file"]), "--json")
    info = json.loads(proc.stdout)
    assert info["kind"] == "sdxl"
    assert info["metadata"]["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert info["tensors"] == len(load_file(str(tiny_sdxl["single_file"])))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    bad = run_tool("tools/show_metadata.py", str(junk), check=False)
    assert bad.returncode == 2 and "junk.safetensors" in bad.stderr and "Traceback" not in bad.stderr


def test_atomic_writes_get_normal_permissions(tmp_path):
    from library.fileio import atomic_write_text

    target = tmp_path / "note.txt"
    atomic_write_text(target, "hello")
    mask = os.umask(0)
    os.umask(mask)
    assert target.read_text() == "hello"
    assert (target.stat().st_mode & 0o777) == (0o666 & ~mask)
