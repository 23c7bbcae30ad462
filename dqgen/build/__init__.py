"""Compiler drivers: one module per toolchain, each turning source text into a binary."""
