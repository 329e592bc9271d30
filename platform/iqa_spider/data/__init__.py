"""The dataset contract (schema_version 1): schema, validation, masks, Parquet I/O."""
