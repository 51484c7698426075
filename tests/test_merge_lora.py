"""tools/merge_lora.py and library/lora_merge.py: kohya LoRAs merged into the tiny SDXL.

Expected weights are computed here by direct math (for convs: by composing the down and up convs on
impulse inputs), never with the library's formula; everything not targeted must stay bit-identical.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from library.errors import ConfigError, ModelError
from library.lora_merge import lora_delta, lora_targets, merge_lora_into, parse_lora_arg

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOL = REPO_ROOT / "tools" / "merge_lora.py"
RATIO_A, RATIO_B = 0.7, -0.3

# (lora name, component, diffusers state-dict key of the target weight, rank, alpha, lora layout)
LORA_A = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "unet",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight", 4, 2.0, "linear"),
    ("lora_unet_down_blocks_2_attentions_0_transformer_blocks_1_attn1_to_k", "unet",
     "down_blocks.2.attentions.0.transformer_blocks.1.attn1.to_k.weight", 4, None, "linear"),
    ("lora_unet_input_blocks_4_0_skip_connection", "unet",
     "down_blocks.1.resnets.0.conv_shortcut.weight", 4, 8.0, "conv"),
    ("lora_unet_output_blocks_0_0_in_layers_2", "unet",
     "up_blocks.0.resnets.0.conv1.weight", 3, 1.0, "conv"),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "te1",
     "encoder.layers.0.self_attn.q_proj.weight", 4, 4.0, "linear"),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "te2",
     "text_model.encoder.layers.0.mlp.fc1.weight", 8, 4.0, "linear"),
]
LORA_B = [
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "te1",  # also in A: the two add up
     "encoder.layers.0.self_attn.q_proj.weight", 2, 1.0, "linear"),
    ("lora_te2_text_model_encoder_layers_1_self_attn_q_proj", "te2",  # q of TE2's fused in_proj
     "text_model.encoder.layers.1.self_attn.q_proj.weight", 4, 2.0, "linear"),
    ("lora_unet_middle_block_1_proj_in", "unet",  # a Linear with a 1x1-conv-shaped LoRA
     "mid_block.attentions.0.proj_in.weight", 4, 4.0, "conv1x1_on_linear"),
]
# Entries of B that must be listed and left out.
B_SKIPPED = [
    "lora_unet_not_a_module",  # matches no module
    "lora_unet_input_blocks_5_0_in_layers_2",  # LoCon with lora_mid
    "lora_unet_input_blocks_7_1_proj_in",  # LoHa
    "lora_te1_text_model_encoder_layers_1_mlp_fc2",  # DoRA
]
COMPONENTS = {"unet": "unet", "te1": "text_encoder1", "te2": "text_encoder2"}


def _make_lora(spec, base, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, component, key, rank, alpha, layout in spec:
        weight = base[component][key]
        out_ch, in_ch = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        down_shape = (rank, in_ch, *kernel) if layout == "conv" else (rank, in_ch)
        up_shape = (out_ch, rank, 1, 1) if layout == "conv" else (out_ch, rank)
        if layout == "conv1x1_on_linear":
            down_shape, up_shape = (rank, in_ch, 1, 1), (out_ch, rank, 1, 1)
        state[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=gen) * 0.5
        state[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=gen) * 0.5
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def _add_unmergeable(state: dict) -> dict:
    state = dict(state)
    state["lora_unet_not_a_module.lora_down.weight"] = torch.ones(2, 8)
    state["lora_unet_not_a_module.lora_up.weight"] = torch.ones(8, 2)
    for part, shape in (("lora_down", (2, 64, 1, 1)), ("lora_mid", (2, 2, 3, 3)), ("lora_up", (64, 2, 1, 1))):
        state[f"lora_unet_input_blocks_5_0_in_layers_2.{part}.weight"] = torch.ones(shape)
    state["lora_unet_input_blocks_7_1_proj_in.hada_w1_a"] = torch.ones(64, 2)
    state["lora_unet_input_blocks_7_1_proj_in.hada_w1_b"] = torch.ones(2, 64)
    dora = "lora_te1_text_model_encoder_layers_1_mlp_fc2"
    state[f"{dora}.lora_down.weight"] = torch.ones(2, 64)
    state[f"{dora}.lora_up.weight"] = torch.ones(32, 2)
    state[f"{dora}.dora_scale"] = torch.ones(1, 64)
    return state


def _state_dicts(models) -> dict:
    return {c: {k: v.detach().clone() for k, v in getattr(models, attr).state_dict().items()}
            for c, attr in COMPONENTS.items()} | {"vae": dict(models.vae.state_dict())}


def _expected_delta(down, up, scale):
    """The weight update by direct math: up @ down for 2D; for a conv LoRA, the weight of the
    composed convolution recovered from impulse responses of down-conv followed by up-conv."""
    down, up = down.double(), up.double()
    if down.ndim == 2:
        return scale * (up @ down)
    in_ch, kh, kw = down.shape[1:]
    probe = torch.zeros(in_ch, in_ch, kh, kw, dtype=torch.float64)
    probe[torch.arange(in_ch), torch.arange(in_ch), kh // 2, kw // 2] = 1.0  # one impulse per input channel
    response = F.conv2d(F.conv2d(probe, down, padding=(kh // 2, kw // 2)), up)  # (in, out, kh, kw)
    return scale * response.flip(-1, -2).permute(1, 0, 2, 3)


def _expected_weights(base, specs_and_states) -> dict:
    expected = {}
    for spec, state, ratio in specs_and_states:
        for name, component, key, rank, alpha, _ in spec:
            scale = ratio * (alpha if alpha is not None else rank) / rank
            delta = _expected_delta(state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"], scale)
            current = expected.get((component, key), base[component][key].double())
            expected[(component, key)] = current + delta.reshape(current.shape)
    return expected


def _run_tool(*args, check_rc=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    if check_rc is not None:
        assert result.returncode == check_rc, result.stderr
    return result


def _load_tool():
    spec = importlib.util.spec_from_file_location("merge_lora_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_in_process(argv, capsys):
    from library.cli import run_main

    code = run_main(_load_tool().main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def base(tiny_sdxl):
    from library.sdxl_model_util import load_models_from_sdxl_checkpoint

    return _state_dicts(load_models_from_sdxl_checkpoint(tiny_sdxl["single_file"]))


@pytest.fixture(scope="module")
def lora_files(base, tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("loras")
    state_a = _make_lora(LORA_A, base, seed=1)
    state_b = _make_lora(LORA_B, base, seed=2)
    save_file(state_a, str(folder / "a.safetensors"))
    save_file(_add_unmergeable(state_b), str(folder / "b.safetensors"))
    return {"a": folder / "a.safetensors", "b": folder / "b.safetensors", "state_a": state_a, "state_b": state_b}


# --- pure functions -----------------------------------------------------------------------------


def test_parse_lora_arg():
    assert parse_lora_arg("a.safetensors") == (Path("a.safetensors"), 1.0)
    assert parse_lora_arg("dir/a.safetensors:0.7") == (Path("dir/a.safetensors"), 0.7)
    assert parse_lora_arg("a.safetensors:-0.25") == (Path("a.safetensors"), -0.25)
    assert parse_lora_arg("C:\\loras\\a.safetensors") == (Path("C:\\loras\\a.safetensors"), 1.0)
    assert parse_lora_arg("C:\\loras\\a.safetensors:0.5") == (Path("C:\\loras\\a.safetensors"), 0.5)
    assert parse_lora_arg("/data/run:2/a.safetensors") == (Path("/data/run:2/a.safetensors"), 1.0)
    for bad in ("a.safetensors:abc", "a.safetensors:", "a.safetensors:nan", ":0.5"):
        with pytest.raises(ConfigError) as info:
            parse_lora_arg(bad)
        assert "--lora" in str(info.value)


def test_conv_delta_equals_composed_convolutions():
    gen = torch.Generator().manual_seed(0)
    down = torch.randn(3, 5, 3, 3, generator=gen, dtype=torch.float64)
    up = torch.randn(7, 3, 1, 1, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 5, 9, 11, generator=gen, dtype=torch.float64)
    delta = lora_delta(down, up, 0.5, dtype=torch.float64)
    assert delta.shape == (7, 5, 3, 3)
    direct = 0.5 * F.conv2d(F.conv2d(x, down, padding=1), up)
    torch.testing.assert_close(F.conv2d(x, delta, padding=1), direct, rtol=1e-12, atol=1e-12)
    # the kohya formula (conv of the permuted weights) gives the same tensor
    kohya = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    torch.testing.assert_close(delta, 0.5 * kohya, rtol=1e-12, atol=1e-12)
    # and the impulse-response expectation used below agrees with both
    torch.testing.assert_close(_expected_delta(down, up, 0.5), delta, rtol=1e-12, atol=1e-12)


# --- the CLI end to end -------------------------------------------------------------------------


def test_merge_two_loras_matches_direct_math(tiny_sdxl, base, lora_files, tmp_path):
    from safetensors import safe_open

    from library.sdxl_model_util import load_models_from_sdxl_checkpoint

    out = tmp_path / "merged.safetensors"
    result = _run_tool("--model", tiny_sdxl["single_file"], "--lora", f"{lora_files['a']}:{RATIO_A}",
                       "--lora", f"{lora_files['b']}:{RATIO_B}", "--save_to", out, check_rc=0)
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"merged a.safetensors (ratio {RATIO_A:g}): 6 modules (unet 4, te1 1, te2 1)"
    assert lines[1] == f"merged b.safetensors (ratio {RATIO_B:g}): 3 modules (unet 1, te1 1, te2 1)"
    assert lines[2].startswith(f"saved {out} (float, 2 LoRAs) in ")
    assert "b.safetensors: 4 LoRA entries not merged" in result.stderr
    for name in B_SKIPPED:
        assert name in result.stderr
    assert "a.safetensors:" not in result.stderr  # A has nothing to report

    merged = _state_dicts(load_models_from_sdxl_checkpoint(out))
    expected = _expected_weights(base, [(LORA_A, lora_files["state_a"], RATIO_A),
                                        (LORA_B, lora_files["state_b"], RATIO_B)])
    assert len(expected) == 8
    for (component, key), want in expected.items():
        got = merged[component][key]
        assert got.dtype == torch.float32
        assert (got - base[component][key]).abs().max() > 1e-2, key  # the LoRA really changed it
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=key)
    for component, tensors in base.items():
        for key, tensor in tensors.items():
            if (component, key) not in expected:
                assert torch.equal(merged[component][key], tensor), f"{component} {key} changed"

    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["sdxl_poster.merged_loras"]) == [
        {"file": "a.safetensors", "ratio": RATIO_A}, {"file": "b.safetensors", "ratio": RATIO_B}]
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_save_precision_fp16(tiny_sdxl, base, lora_files, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "merged16.safetensors"
    code, stdout, err = _run_in_process(["--model", tiny_sdxl["single_file"], "--lora", lora_files["a"],
                                         "--save_to", out, "--save_precision", "fp16"], capsys)
    assert code == 0, err
    assert "(ratio 1): 6 modules" in stdout
    with safe_open(str(out), framework="pt") as handle:
        dtypes = {handle.get_tensor(k).dtype for k in handle.keys()}
        q = handle.get_tensor("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")
    assert dtypes == {torch.float16}
    want = _expected_weights(base, [(LORA_A, lora_files["state_a"], 1.0)])[("te1", LORA_A[4][2])]
    torch.testing.assert_close(q.double(), want.half().double(), rtol=0, atol=0)


def test_diffusers_folder_model_gives_the_same_merge(tiny_sdxl, lora_files, tmp_path, capsys):
    from safetensors.torch import load_file

    single, folder = tmp_path / "from_single.safetensors", tmp_path / "from_folder.safetensors"
    for model, out in ((tiny_sdxl["single_file"], single), (tiny_sdxl["diffusers"], folder)):
        code, _, err = _run_in_process(["--model", model, "--lora", f"{lora_files['a']}:0.5", "--save_to", out], capsys)
        assert code == 0, err
    a, b = load_file(str(single)), load_file(str(folder))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- errors -------------------------------------------------------------------------------------


def test_strict_makes_skipped_entries_an_error(tiny_sdxl, lora_files, tmp_path, capsys):
    out = tmp_path / "strict.safetensors"
    code, _, err = _run_in_process(["--model", tiny_sdxl["single_file"], "--lora", lora_files["b"],
                                    "--save_to", out, "--strict"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "b.safetensors" in err and "4 LoRA entries not merged" in err and "lora_unet_not_a_module" in err
    assert not out.exists()


def test_lora_without_recognised_keys_is_an_error(tiny_sdxl, tmp_path, capsys):
    from safetensors.torch import save_file

    sd1 = tmp_path / "sd1.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 32),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(64, 2)}, str(sd1))
    out = tmp_path / "out.safetensors"
    code, _, err = _run_in_process(["--model", tiny_sdxl["single_file"], "--lora", sd1, "--save_to", out], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "sd1.safetensors" in err and "no kohya-style lora_unet_/lora_te1_/lora_te2_ keys" in err
    assert not out.exists()


def test_missing_or_wrong_lora_file(tiny_sdxl, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    code, _, err = _run_in_process(["--model", tiny_sdxl["single_file"], "--lora", tmp_path / "nope.safetensors",
                                    "--save_to", out], capsys)
    assert code == 2 and "nope.safetensors: LoRA file not found" in err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00garbage")
    code, _, err = _run_in_process(["--model", tiny_sdxl["single_file"], "--lora", broken, "--save_to", out], capsys)
    assert code == 2 and "broken.safetensors: not a readable safetensors file" in err
    pickle = tmp_path / "lora.pt"
    pickle.write_bytes(b"x")
    code, _, err = _run_in_process(["--model", tiny_sdxl["single_file"], "--lora", pickle, "--save_to", out], capsys)
    assert code == 2 and "must be .safetensors" in err
    assert not out.exists()


def test_shape_mismatch_names_file_and_key(tiny_sdxl, lora_files):
    from library.sdxl_model_util import load_models_from_sdxl_checkpoint

    models = load_models_from_sdxl_checkpoint(tiny_sdxl["single_file"])
    before = models.text_encoder1.state_dict()["encoder.layers.0.self_attn.q_proj.weight"].clone()
    name = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    state = {f"{name}.lora_down.weight": torch.ones(2, 32), f"{name}.lora_up.weight": torch.ones(32, 2),
             "lora_unet_middle_block_1_proj_in.lora_down.weight": torch.ones(2, 48),  # in 64, not 48
             "lora_unet_middle_block_1_proj_in.lora_up.weight": torch.ones(64, 2)}
    with pytest.raises(ModelError) as info:
        merge_lora_into(models, state, 1.0, "bad.safetensors")
    assert "bad.safetensors: lora_unet_middle_block_1_proj_in" in str(info.value)
    # nothing was merged: shapes are checked before any weight changes
    assert torch.equal(models.text_encoder1.state_dict()["encoder.layers.0.self_attn.q_proj.weight"], before)
    targets = lora_targets(models)
    assert targets["lora_unet_middle_block_1_proj_in"][1] is targets["lora_unet_mid_block_attentions_0_proj_in"][1]


def test_bad_ratio_is_one_line_without_traceback(tiny_sdxl, lora_files, tmp_path):
    out = tmp_path / "out.safetensors"
    result = _run_tool("--model", tiny_sdxl["single_file"], "--lora", f"{lora_files['a']}:lots",
                       "--save_to", out, check_rc=2)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert "--lora" in result.stderr and "'lots' is not a number" in result.stderr
    assert not out.exists()


def test_existing_output_needs_overwrite(tiny_sdxl, lora_files, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"mine")
    result = _run_tool("--model", tiny_sdxl["single_file"], "--lora", lora_files["a"], "--save_to", out, check_rc=2)
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"mine"
