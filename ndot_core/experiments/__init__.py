"""Offline experiments: ``ndot train|eval|compare`` over datasets, with metrics files, plots and checkpoints.

``data`` names the datasets and loads them as frame arrays, ``frame_sets`` batches them, ``runs``
trains and evaluates one configuration, ``compare`` runs several side by side, ``memory`` measures
peak memory, ``plots`` and ``run_files`` write what a run leaves behind, ``cli`` is the command line.
"""
