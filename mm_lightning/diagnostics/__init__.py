"""Training diagnostics: pure statistics, the callback that logs them, figures and health verdicts."""
