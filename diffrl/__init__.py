"""diffrl: reinforcement-learning alignment of diffusion models (AWM, Flow-GRPO, SePPO, Diffusion-DPO for
images and video; IGPO and diffu-GRPO for diffusion language models). Start with the README or `diffrl --help`."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffrl")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

_API = ("train", "load", "sample", "score")


def __getattr__(name: str):
    """``diffrl.train / load / sample / score`` (diffrl.api), imported on first use so that `import diffrl`
    and the command line's start stay light."""
    if name in _API:
        from diffrl import api

        return getattr(api, name)
    raise AttributeError(f"module 'diffrl' has no attribute {name!r}")
