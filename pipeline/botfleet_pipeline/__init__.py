"""Training pipeline for botfleet models: train, quantize, evaluate.

Each step is a plain function (``botfleet_pipeline.train.train``,
``botfleet_pipeline.quantize.ptq`` / ``qat``, ``botfleet_pipeline.evaluate.evaluate`` /
``export_gate``) so an Airflow task can call it directly; ``python -m botfleet_pipeline``
wraps the same functions in a command line.
"""

__version__ = "0.1.0"
