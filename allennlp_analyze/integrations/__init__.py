"""One small module per other framework or engine, each the only place that imports it."""
