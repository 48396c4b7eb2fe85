"""What each job takes: one config dataclass per job, filled from YAML and flags, validated early."""

from shardsmith.errors import ConfigError
from shardsmith.pipelines.config.base import from_dict, load_config_file, to_dict
from shardsmith.pipelines.config.curate import CurateConfig, config_from_dict, parse_head_flag, pin_predictor_flag

__all__ = ["ConfigError", "CurateConfig", "config_from_dict", "from_dict", "load_config_file", "parse_head_flag",
           "pin_predictor_flag", "to_dict"]
