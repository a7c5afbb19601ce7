"""The model registry (MLflow): versions that index run directories, aliases with history, promotion gates, rollback, model cards."""
