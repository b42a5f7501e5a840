"""The libraries every floor stands on: config, files, parallel work, plots, models, errors."""
