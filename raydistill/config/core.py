# TEMPORARY shim while the package is being split (removed before commit).
from raydistill.config import *  # noqa
from raydistill.config.errors import ConfigError  # noqa
from raydistill.config.loading import config_from_dict, config_to_dict, load_config, preset_names, read_preset as _read_yaml, merge_overrides, parse_override  # noqa
from raydistill.config.validate import validate, validate_against_data  # noqa
from raydistill.methods.ratbptt.config import RatBpttConfig  # noqa
