"""kohya's ``--sample_sampler`` names -> diffusers schedulers.

Every name kohya's sd-scripts accepts is here, with the ``k_`` aliases:

- ``ddim``: DDIMScheduler; ``ddpm``: DDPMScheduler; ``pndm``: PNDMScheduler (PLMS, ``skip_prk_steps``)
- ``lms``/``k_lms``: LMSDiscreteScheduler; ``heun``: HeunDiscreteScheduler
- ``euler``/``k_euler``: EulerDiscreteScheduler; ``euler_a``/``k_euler_a``: EulerAncestralDiscreteScheduler
- ``dpm_2``/``k_dpm_2``: KDPM2DiscreteScheduler; ``dpm_2_a``/``k_dpm_2_a``: KDPM2AncestralDiscreteScheduler
- ``dpmsolver``/``dpmsolver++``: DPMSolverMultistepScheduler with that ``algorithm_type`` (``dpmsolver``
  ends on ``sigma_min``, the only final sigma it supports); ``dpmsingle``: DPMSolverSinglestepScheduler

The scheduler is built ``from_config`` of the model's own scheduler config (its betas, timestep spacing,
prediction type), so it samples the way the model was trained. Names are case-insensitive.
"""

from __future__ import annotations

import difflib
import logging
import warnings
from typing import Any, Mapping

from library.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_SAMPLER = "euler_a"

# name -> (diffusers class name, options passed to from_config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a"}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS) + tuple(ALIASES)
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_sampler(name: str | None, where: str | None = None) -> str:
    """The canonical table name for ``name`` (an alias or any case; None or "" is the default
    ``euler_a``); ConfigError with a did-you-mean."""
    if name is None or not str(name).strip():
        return DEFAULT_SAMPLER
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key in SAMPLERS:
        return key
    near = difflib.get_close_matches(key, SAMPLER_NAMES, n=1, cutoff=0.5)
    hint = f"did you mean {near[0]}?" if near else f"use one of: {', '.join(SAMPLER_NAMES)}"
    raise ConfigError(f"unknown sampler '{name}'", where=where or "--sample_sampler", hint=hint)


def build_scheduler(name: str | None, scheduler_config: Mapping[str, Any], prediction_type: str | None = None,
                    zero_terminal_snr: bool = False):
    """A fresh diffusers scheduler for sampler ``name`` from the model's ``scheduler_config``.

    ``prediction_type`` (``"epsilon"`` or ``"v_prediction"``, e.g. for a ``--v_parameterization`` run)
    overrides the config's. ``zero_terminal_snr`` (a ``--zero_terminal_snr`` run) samples with the
    schedule the model was trained on: betas rescaled to zero terminal SNR and "trailing" timesteps,
    so sampling starts from pure noise; samplers without that option warn and sample as before.
    """
    import inspect

    import diffusers

    key = check_sampler(name)
    class_name, options = SAMPLERS[key]
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    if prediction_type is not None:
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"unknown prediction type '{prediction_type}'", hint="use epsilon or v_prediction")
        config["prediction_type"] = prediction_type
    scheduler_class = getattr(diffusers, class_name)
    if zero_terminal_snr:
        if "rescale_betas_zero_snr" in inspect.signature(scheduler_class.__init__).parameters:
            config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        else:
            zero_snr = [k for k, (c, _) in SAMPLERS.items() if "rescale_betas_zero_snr"
                        in inspect.signature(getattr(diffusers, c).__init__).parameters]  # fmt: skip
            log.warning("sampler %s cannot sample with the zero-terminal-SNR schedule the model is trained on; "
                        "use one of %s", key, ", ".join(zero_snr))  # fmt: skip
    with warnings.catch_warnings():
        # the config holds keys for other schedulers; "dpmsolver" is deprecated in favour of "dpmsolver++"
        warnings.simplefilter("ignore")
        return scheduler_class.from_config({**config, **options})
