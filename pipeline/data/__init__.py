"""Raw data: formats, the example schema, dedup, the embedded generator, mixtures, safety rules."""
