"""Data: the data set registry and its built-in loaders, ZCA whitening and differentiable augmentation."""

import raydistill.data.loaders  # noqa: F401  (registers the built-in data sets)
import raydistill.data.parquet  # noqa: F401  (registers parquet: sets written by raydistill prepare)
