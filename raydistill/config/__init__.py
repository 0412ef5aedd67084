"""Configuration: the typed schema, loading (presets, --set), validation and the layer's error type.

`raydistill.config` itself exports the schema and ConfigError only, so every layer can import it without pulling in
the registries that validation consults; build configs with raydistill.config.loading.
"""

from raydistill.config.errors import ConfigError
from raydistill.config.schema import (
    AugmentConfig,
    BoostConfig,
    BoostStage,
    DataConfig,
    DistillConfig,
    EvalConfig,
    InitConfig,
    LabelConfig,
    MetaOptConfig,
    ModelConfig,
    RayConfig,
)

__all__ = ["AugmentConfig", "BoostConfig", "BoostStage", "ConfigError", "DataConfig", "DistillConfig", "EvalConfig",
           "InitConfig", "LabelConfig", "MetaOptConfig", "ModelConfig", "RayConfig"]
