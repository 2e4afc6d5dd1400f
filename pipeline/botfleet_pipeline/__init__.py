"""Training pipeline for botfleet models: train, quantize, evaluate, ship.

Each step is a plain function (``botfleet_pipeline.train.train``,
``botfleet_pipeline.quantize.ptq`` / ``qat``, ``botfleet_pipeline.evaluate.evaluate`` /
``export_gate``, ``botfleet_pipeline.ship.register`` / ``start_rollout`` /
``wait_for_rollout``) so an Airflow task can call it directly; ``python -m
botfleet_pipeline`` wraps the same functions in a command line. ``ship`` and ``client``
need only the standard library, so an Airflow worker imports them without torch or onnx.
"""

__version__ = "0.1.0"
