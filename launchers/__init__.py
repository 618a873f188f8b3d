"""Built-in launchers, registered through the ``virtex`` entry-point group."""

from virtex import hookimpl


def slurm_launcher():
    """The SLURM launcher (imported on use: it needs submitit)."""
    from virtex.launchers.slurm import SlurmLauncher

    return SlurmLauncher()


@hookimpl
def virtex_launchers() -> dict:
    from virtex.launchers.local import LocalLauncher

    return {"local": LocalLauncher, "slurm": slurm_launcher}
