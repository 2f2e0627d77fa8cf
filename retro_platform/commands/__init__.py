"""The `retro` commands, one module each, above the stages they run.

A command opens the Ray session, starts what it needs (e.g. a neighbour pool), calls the stages
(``db``, ``neighbors``, ``train``, ``serve``) and reports. The stages never import a command, and no
stage imports a later one (``tests/test_layers.py`` checks it).
"""
