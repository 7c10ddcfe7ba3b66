"""Shared pieces of the training recipes (``recipes/*.py``): arguments, data, metrics, optimizers, one loop.

Each recipe script builds a ``Task`` (model, data, loss, evaluation) from the parsed arguments and hands it to
``loop.train``; everything else (Accelerate, checkpoints, compression hooks, results, model card, Hub) is here.
"""
