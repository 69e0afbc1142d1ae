"""Datasets in verl's parquet layout, the Knights-and-Knaves generator, prompt templates."""
