"""Makes the built-in ``specs/`` directory runnable by spec name."""

from pathlib import Path

from virtex import hookimpl


@hookimpl
def virtex_spec_dirs() -> list[Path]:
    import virtex.specs

    return [Path(virtex.specs.__file__).parent]
