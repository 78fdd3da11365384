"""The files between the pipeline's stages, as typed objects: plans, run records, weights.

``plan.py`` holds :class:`Plan` (``plans.json``), ``run.py`` :class:`RunRecord` (``run.json``)
and the names of the files in a run folder, ``weights.py`` checkpoints and safetensors weights.
Everything above this layer reads attributes of these objects, never string keys.
"""
