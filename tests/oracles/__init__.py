"""Independent numpy implementations of the checkpoint layouts, written from
shared/spec/FORMATS.md alone; they import nothing from dqgen."""
