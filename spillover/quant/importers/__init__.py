"""Importers: published quantized layouts -> our formats, repacked without a float round trip."""
