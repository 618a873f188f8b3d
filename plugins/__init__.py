"""virtex's built-in plugins: each registers through the ``virtex`` entry-point group."""
