"""Built-in launchers, registered through the ``virtex`` entry-point group."""

from virtex import hookimpl


@hookimpl
def virtex_launchers() -> dict:
    from virtex.launchers.local import LocalLauncher

    return {"local": LocalLauncher}
