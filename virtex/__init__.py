"""virtex: a declarative, spec-driven experiment runner for VirTex."""

from virtex.hookspecs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec", "__version__"]
__version__ = "0.1.0"
