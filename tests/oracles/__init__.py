"""Independent numpy implementations of the checkpoint layouts, written from
docs/FORMATS.md alone; they import nothing from dqgen."""
