"""Demo and benchmark support: models by name, the timing runner, the byte LM, plots; the library proper never
imports it (only the CLI does, for models by name and the demo)."""
