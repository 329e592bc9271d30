"""MLflow: tracking runs, logging and registering models (promotion builds on this)."""
