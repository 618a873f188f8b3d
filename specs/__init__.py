"""Built-in specs (gin files), installed as package data of ``virtex.specs``."""
