"""Named rule sets that reproduce well-known LAION subsets."""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "laion-aesthetics-5plus": {
        "description": "LAION-Aesthetics v2 5+: aesthetic >= 5, pwatermark < 0.8, punsafe < 0.5",
        "rules": ["aesthetic >= 5", "pwatermark < 0.8", "punsafe < 0.5"],
    },
    "sd-improved-aesthetics": {
        "description": "Stable Diffusion 'improved aesthetics' set: original size >= 512x512, "
                       "aesthetic > 5.0, pwatermark < 0.5",
        "rules": ["min_side >= 512", "aesthetic > 5.0", "pwatermark < 0.5"],
    },
    "datacomp-basic": {
        "description": "DataComp basic filtering's size and aspect part: min side >= 200, aspect <= 3",
        "rules": ["min_side >= 200", "aspect_ratio <= 3"],
    },
    "none": {"description": "keep every readable sample", "rules": []},
}


def preset_rules(name: str) -> list[str]:
    from shardsmith.filters.rules import RuleError

    if name not in PRESETS:
        raise RuleError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return list(PRESETS[name]["rules"])
