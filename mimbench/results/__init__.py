"""Run records (one JSON per evaluation), published leaderboard, reports and plots."""
from mimbench.results.records import (
    SCHEMA_VERSION,
    encoder_summary,
    environment_info,
    load_records,
    new_record,
    record_problems,
    validate_record,
    write_record,
)

__all__ = ["SCHEMA_VERSION", "encoder_summary", "environment_info", "load_records", "new_record", "record_problems",
           "validate_record", "write_record"]
