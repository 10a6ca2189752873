"""Drop-in replacements for other tools' Python APIs, writing and reading deltapack deltas.

- :mod:`deltapack.compat.deltatensors`: the public API of deltatensors 0.2.0
  (``import deltapack.compat.deltatensors as dt`` in place of ``import deltatensors as dt``).

Nothing is imported here: each module loads only when it is imported.
"""
