"""Files in and out: checked opens (``fileio``) and atomic writes (``atomic``), Keras models (``keras``,
``keras_graph``), the lab's h5 data (``lab_data``), image files (``images``), the trigger paste and poisoned sets
(``poisoning``) and orbax checkpoints (``checkpoint``, ``graph_json``).

Every reader refuses a hostile or malformed file with a :class:`badnet_jax.errors.BadNetError` that names
the file and the problem; every writer replaces its target whole or not at all.
"""
