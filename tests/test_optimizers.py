"""library/optimizers.py: kohya's --optimizer_args parsing and every optimizer name stepping on CPU."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from library.errors import ConfigError
from library.optimizers import adafactor_kwargs, build_optimizer, parse_optimizer_args

SEED_ADAFACTOR_ARGS = ["scale_parameter=False", "relative_step=False", "warmup_init=False", "clip_threshold=1.0"]


def test_optimizer_args_are_parsed_as_kohya_does():
    parsed = parse_optimizer_args(SEED_ADAFACTOR_ARGS + ["weight_decay=0.01", "betas=0.9,0.999", "eps=1e-8",
                                                         "decouple=true", "mode=fast", "d_coef=2", "x=none"])  # fmt: skip
    assert parsed == {"scale_parameter": False, "relative_step": False, "warmup_init": False, "clip_threshold": 1.0,
                      "weight_decay": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "decouple": True, "mode": "fast",
                      "d_coef": 2, "x": None}  # fmt: skip
    assert type(parsed["d_coef"]) is int and type(parsed["clip_threshold"]) is float
    assert parse_optimizer_args(["expr=__import__('os').getcwd()"])["expr"] == "__import__('os').getcwd()"  # never eval
    assert parse_optimizer_args(["a=x=y"]) == {"a": "x=y"}
    assert parse_optimizer_args(None) == {}


@pytest.mark.parametrize("bad", ["weight_decay", "=1", "lr =", "scale_parameter=False relative_step=False"])
def test_bad_optimizer_args_are_config_errors(bad):
    with pytest.raises(ConfigError) as err:
        parse_optimizer_args([bad])
    assert "--optimizer_args" in str(err.value)


def _step(name: str, args: dict | None = None, lr: float = 1e-3):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)  # 4096 weights: big enough for bitsandbytes' 8-bit state
    groups = [{"params": list(model.parameters()), "lr": lr}]
    optimizer = build_optimizer(name, groups, lr, args or {})
    before = model.weight.detach().clone()
    model(torch.randn(4, 64)).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(before, model.weight), f"{name} did not change the weights"
    assert "lr" in groups[0] and groups[0]["lr"] == lr  # the caller's groups are left alone
    return optimizer


@pytest.mark.parametrize(
    "name, cls",
    [("AdamW", "AdamW"), ("adamw", "AdamW"), ("SGDNesterov", "SGD"), ("RAdam", "RAdam"), ("adagrad", "Adagrad"),
     ("torch.optim.Adam", "Adam"), ("AdamW8bit", "AdamW8bit"), ("Lion8bit", "Lion8bit"),
     ("PagedAdamW8bit", "PagedAdamW8bit"), ("Lion", "Lion"), ("SGDNesterov8bit", "SGD8bit")],
)  # fmt: skip
def test_each_optimizer_builds_and_steps(name, cls):
    assert type(_step(name)).__name__ == cls


def test_sgd_nesterov_gets_momentum_and_nesterov():
    optimizer = _step("SGDNesterov")
    assert optimizer.defaults["nesterov"] is True and optimizer.defaults["momentum"] == 0.9
    assert _step("SGDNesterov", {"momentum": 0.5}).defaults["momentum"] == 0.5


def test_adafactor_receives_the_seed_arguments(caplog):
    with caplog.at_level(logging.WARNING, logger="library.optimizers"):
        optimizer = _step("AdaFactor", parse_optimizer_args(SEED_ADAFACTOR_ARGS), lr=4e-7)
    assert type(optimizer).__name__ == "Adafactor"
    d = optimizer.defaults
    assert (d["clip_threshold"], d["relative_step"], d["scale_parameter"], d["warmup_init"], d["lr"]) == (
        1.0, False, False, False, 4e-7)  # fmt: skip
    assert optimizer.param_groups[0]["lr"] == 4e-7


def test_adafactor_relative_step_rules(caplog):
    assert adafactor_kwargs(1e-5, {}) == (None, {"relative_step": True})  # default when not given
    lr, kwargs = adafactor_kwargs(1e-5, {"relative_step": False, "warmup_init": True})
    assert lr is None and kwargs["relative_step"] is True  # warmup_init forces relative_step
    assert adafactor_kwargs(1e-5, {"relative_step": False}) == (1e-5, {"relative_step": False})

    model = torch.nn.Linear(4, 4)
    with caplog.at_level(logging.WARNING, logger="library.optimizers"):
        optimizer = build_optimizer("adafactor", [{"params": list(model.parameters()), "lr": 5e-5}], 1e-5, {},
                                    lr_scheduler="cosine")  # fmt: skip
    assert optimizer.defaults["relative_step"] is True and optimizer.defaults["lr"] is None
    assert optimizer.param_groups[0]["lr"] == 1e-5  # the initial lr the adafactor schedule reports
    text = caplog.text
    assert "initial lr" in text and "ignored" in text and "'adafactor' scheduler" in text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="library.optimizers"):
        build_optimizer("AdaFactor", [model.weight], 1e-5, {"relative_step": False, "clip_threshold": 2.0},
                        lr_scheduler="cosine", max_grad_norm=1.0)  # fmt: skip
    assert "max_grad_norm" in caplog.text and "constant_with_warmup" in caplog.text and "clip_threshold" in caplog.text


def test_unknown_names_and_arguments_are_config_errors():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="did you mean 'AdaFactor'"):
        build_optimizer("AdaFactr", params, 1e-3, {})
    with pytest.raises(ConfigError, match="did you mean 'weight_decay'"):
        build_optimizer("AdamW", params, 1e-3, {"weight_decy": 0.1})
    with pytest.raises(ConfigError, match="no_such_package"):
        build_optimizer("no_such_package.Opt", params, 1e-3, {})
    with pytest.raises(ConfigError, match="Invalid beta"):
        build_optimizer("AdamW", params, 1e-3, {"betas": (2.0, 0.9)})


def test_optional_packages_name_the_pip_package_or_are_used(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(2))]
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # not installed
    with pytest.raises(ConfigError, match="pip install prodigyopt"):
        build_optimizer("Prodigy", params, 1.0, {})
    with pytest.raises(ConfigError, match="pip install dadaptation"):
        monkeypatch.setitem(sys.modules, "dadaptation", None)
        build_optimizer("DAdaptAdam", params, 1.0, {})

    fake = types.ModuleType("prodigyopt")

    class Prodigy(torch.optim.SGD):
        pass

    fake.Prodigy = Prodigy
    monkeypatch.setitem(sys.modules, "prodigyopt", fake)
    optimizer = build_optimizer("prodigy", params, 1.0, {"weight_decay": 0.01})
    assert isinstance(optimizer, Prodigy) and optimizer.defaults["lr"] == 1.0
    assert optimizer.defaults["weight_decay"] == 0.01


@pytest.mark.parametrize("name, args", [("AdamW", {"weight_decay": 0.01}), ("AdaFactor", {"relative_step": False}),
                                        ("AdamW8bit", {})])  # fmt: skip
@pytest.mark.parametrize("clip,mode", [(None, "per_tensor"), (0.01, "per_tensor"), (0.01, "global"), (1e3, "global")])
@pytest.mark.parametrize("groups", [None, 2])
def test_fused_backward_pass_equals_a_normal_step(name, args, clip, mode, groups):
    from library.optimizers import attach_fused_backward

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
        groups = [{"params": list(model[0].parameters()), "lr": 1e-2}, {"params": list(model[2].parameters()), "lr": 1e-3}]
        return model, build_optimizer(name, groups, 1e-2, args)

    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    plain, plain_opt = setup()
    fused, fused_opt = setup()
    hooks = attach_fused_backward(fused_opt, max_grad_norm=clip, clip=mode, groups=groups)
    for _ in range(3):
        plain(x).pow(2).mean().backward()
        if clip and mode == "per_tensor":
            for p in plain.parameters():  # kohya's per-parameter clipping
                torch.nn.utils.clip_grad_norm_([p], clip)
        elif clip:
            norm = torch.nn.utils.clip_grad_norm_(list(plain.parameters()), clip)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        hooks.backward(fused(x).pow(2).mean())
        assert all(p.grad is None for p in fused.parameters())  # freed inside backward
        if mode == "global":
            assert hooks.last_norm == pytest.approx(float(norm), rel=1e-5)
            assert (float(norm) > clip) == (clip < 1)  # 0.01 really clips, 1e3 does not
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert torch.allclose(a, b, atol=1e-7)
    assert all(len(g["params"]) == 2 for g in fused_opt.param_groups)  # groups restored
    hooks()  # removes the hooks
    fused(x).pow(2).mean().backward()
    assert all(p.grad is not None for p in fused.parameters())


def test_fused_groups_step_once_all_their_gradients_exist():
    from library.optimizers import attach_fused_backward, split_in_groups

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 10, 10, 30, 5, 5)]
    # a run closes once it holds its share (70 / 3 elements)
    assert [[p.numel() for p in g] for g in split_in_groups(params, 3)] == [[10, 10, 10], [30], [5, 5]]
    assert len(split_in_groups(params, 100)) == len(params)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    original = optimizer.step

    def counting_step(*a, **k):
        steps.append(sum(len(g["params"]) for g in optimizer.param_groups))
        return original(*a, **k)

    optimizer.step = counting_step
    hooks = attach_fused_backward(optimizer, groups=3)
    # groups by size (153 elements): [w0], [b0, w1], [b1, w2, b2]; layer 0 gets no gradient this time
    for p in model[0].parameters():
        p.requires_grad_(False)
    hooks.backward(model(torch.randn(4, 8)).sum())
    # [b1, w2, b2] steps inside backward; [b0, w1] is stepped after it (b0 never got its gradient); [w0] not
    assert steps == [3, 2] and all(p.grad is None for p in model.parameters())
