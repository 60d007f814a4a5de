"""The study: spec, search space, trials, report, export, the CLI and the demo."""
