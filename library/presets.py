"""Named negative-prompt presets from the poster workflow.

Used by sample prompt files (``--np basic`` / ``{preset:anime}``, see ``library.sampling``) and by
``tools/evaluate.py generate --negative_preset``. Several names can be combined with ``+``
(``basic+non_adult``); repeated terms are kept once, in first-seen order.
"""

from __future__ import annotations

from library.errors import ConfigError

_BODY_TERMS = (
    "bad anatomy, bad hands, three hands, three legs, bad arms, missing legs, missing arms, "
    "poorly drawn face, bad face, fused face, cloned face, worst face, three crus, extra crus, "
    "fused crus, worst feet, three feet, fused feet, fused thigh, three thigh, extra thigh, "
    "worst thigh, missing fingers, extra fingers, ugly fingers, long fingers, horn"
)

NEGATIVE_PRESETS: dict[str, str] = {
    "basic": (
        "worst quality, normal quality, low quality, low res, blurry, text, watermark, logo, banner, "
        "extra digits, cropped, jpeg artifacts, signature, username, error, sketch, duplicate, ugly, "
        "monochrome, horror, geometry, mutation, disgusting"
    ),
    "anime": _BODY_TERMS
    + ", realistic photo, extra eyes, huge eyes, 2girl, amputation, disconnected limbs",
    "realistic": _BODY_TERMS
    + ", extra eyes, huge eyes, 2girl, amputation, disconnected limbs, cartoon, cg, 3d, unreal, animate",
    "non_adult": "nsfw, nude, censored",
}


def negative_preset(spec: str) -> str:
    """Return the negative prompt for ``spec``: one preset name or several joined by ``+``."""
    terms: list[str] = []
    for name in (part.strip() for part in spec.split("+")):
        if name not in NEGATIVE_PRESETS:
            known = ", ".join(sorted(NEGATIVE_PRESETS))
            raise ConfigError(f"unknown negative preset '{name}'", hint=f"known presets: {known}")
        for term in NEGATIVE_PRESETS[name].split(","):
            term = term.strip()
            if term and term not in terms:
                terms.append(term)
    return ", ".join(terms)
