"""shardsmith: curate LAION-style image-text datasets and mass-produce images on Ray.

The one name this project installs. Its subpackages are the repository's top-level folders:

    shardsmith.jobs       jobs/       entry points, the CLI and the Python API
    shardsmith.pipelines  pipelines/  run core, I/O formats, Ray stages, sinks, flows, report
    shardsmith.filters    filters/    CLIP embedder, score registry, heads, rules (plain torch, no Ray)
    shardsmith.cluster    cluster/    job submission and cluster configs (no model code)

In an installed wheel they sit under ``site-packages/shardsmith/``; in a source checkout (an
editable install, or a Ray job whose working directory is the checkout) this package finds them
beside itself. Importing ``shardsmith`` is cheap: the job functions load on first use.

    import shardsmith
    stats = shardsmith.curate("data/{00000..00009}.tar", "out", preset="none", clip_model=..., ...)
    shardsmith.recurate("out", "out-aes6", rules=["aesthetic >= 6"])   # no re-embedding

Every job function validates its arguments as the CLI does and raises the CLI's one-line errors as
``shardsmith.ConfigError`` / ``InputError`` / ``RunError`` (all ``ShardsmithError``); see
``shardsmith.jobs.api`` and the README's "Python API".
"""

from __future__ import annotations

import os as _os

_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")) and _os.path.isfile(
        _os.path.join(_checkout, "pipelines", "__init__.py")):
    __path__.append(_checkout)  # a source checkout: jobs/, pipelines/, ... are shardsmith.jobs, ...

JOBS = ["curate", "download", "generate", "augment", "recurate", "report", "fit_head"]  # + "dedup" when it lands
ERRORS = ["ShardsmithError", "ConfigError", "InputError", "RunError"]
__all__ = [*JOBS, *ERRORS, "__version__"]


def __getattr__(name: str):
    if name == "__version__":
        from shardsmith.errors import version

        return version()
    if name in ERRORS:
        from shardsmith import errors

        return getattr(errors, name)
    if name in __all__:
        from shardsmith.jobs import api

        return getattr(api, name)
    raise AttributeError(f"module 'shardsmith' has no attribute {name!r}")
