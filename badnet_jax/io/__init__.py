"""Files in and out: checked opens and atomic writes (``fileio``), Keras models (``keras``), the lab's h5 data
and images (``lab_data``) and orbax checkpoints (``checkpoint``).

Every reader refuses a hostile or malformed file with a :class:`badnet_jax.errors.BadNetError` that names
the file and the problem; every writer replaces its target whole or not at all.
"""
